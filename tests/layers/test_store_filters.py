"""store_filters: an STU / STU-T carries its filter bank in the checkpoint instead of recomputing it."""

import pytest
import torch

from spectralds.checkpoint_io import load_model
from spectralds.errors import UserError
from spectralds.layers import build_layer, layer_specs, restore_layers
from spectralds.models import LanguageModel
from spectralds.models.common import save_layer_specs

F64 = torch.float64


def tiny_lm(store: bool, **kw) -> LanguageModel:
    torch.manual_seed(0)
    spec = {"store_filters": store}
    return LanguageModel(vocab_size=32, dim=16, num_layers=2, layer_pattern=["stu", "stu_t"], seq_len=32,
                         num_filters=4, layer_kwargs={"stu": spec, "stu_t": spec}, **kw).eval()


def custom_bank(layer) -> torch.Tensor:
    """The layer's bank with columns reordered and two signs flipped: what a source's LAPACK may give."""
    return layer.phi[:, [2, 0, 3, 1]] * torch.tensor([1.0, -1.0, 1.0, -1.0])


def test_by_default_the_bank_stays_out_of_the_state_dict():
    model = tiny_lm(False)
    assert not any(k.endswith("phi") for k in model.state_dict())
    assert not any(spec.get("store_filters") for spec in layer_specs(model).values())
    old = dict(model.state_dict())  # what a checkpoint from before the option holds
    tiny_lm(False).load_state_dict(old, strict=True)


@pytest.mark.parametrize("kind", ["stu", "stu_t"])
def test_a_stored_bank_is_saved_loaded_and_used(kind):
    layer = build_layer(kind, dim=6, seq_len=20, num_filters=4, store_filters=True).double()
    x = torch.randn(2, 20, 6, dtype=F64)
    with torch.no_grad():
        before = layer(x)  # fills the spectrum cache with the computed bank
        state = {**layer.state_dict(), "phi": custom_bank(layer).clone()}
        fresh = build_layer(kind, dim=6, seq_len=20, num_filters=4, store_filters=True).double()
        fresh.load_state_dict(state)
        layer.load_state_dict(state)
        expected = build_layer(kind, dim=6, seq_len=20, num_filters=4, filters=state["phi"]).double()
        expected.load_state_dict({k: v for k, v in state.items() if k != "phi"})
        torch.testing.assert_close(layer(x), expected(x), rtol=0, atol=0)  # the cache was emptied
        torch.testing.assert_close(fresh(x), expected(x), rtol=0, atol=0)
        assert (layer(x) - before).abs().max() > 1e-3
    assert torch.equal(layer.phi, state["phi"]) and layer.phi.dtype == F64


def test_language_model_checkpoint_round_trip_with_a_custom_bank(tmp_path):
    model = tiny_lm(True)
    with torch.no_grad():
        for block in model.blocks:
            block.mixer.phi.copy_(custom_bank(block.mixer))
    assert {"blocks.0.mixer.phi", "blocks.1.mixer.phi"} <= set(model.state_dict())
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    save_layer_specs(model, checkpoint)
    assert checkpoint["spectralds_layers"]["blocks.0.mixer"]["store_filters"] is True
    torch.save(checkpoint, tmp_path / "model.ckpt")
    loaded = load_model(tmp_path / "model.ckpt")
    idx = torch.randint(0, 32, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)
        assert (loaded(idx) - tiny_lm(True)(idx)).abs().max() > 1e-4  # the bank, not the default one


def test_the_layer_spec_rebuilds_a_storing_layer():
    model = tiny_lm(False)
    specs = layer_specs(tiny_lm(True))
    assert restore_layers(model, specs) == ["blocks.0.mixer", "blocks.1.mixer"]
    assert all(block.mixer.store_filters for block in model.blocks)


def test_a_wrong_bank_is_a_one_line_error():
    layer = build_layer("stu", dim=6, seq_len=20, num_filters=4, store_filters=True)
    for bad in (torch.zeros(20, 5), torch.zeros(16, 4), torch.zeros(20, 4, dtype=torch.long)):
        with pytest.raises(UserError, match="stored filter bank phi") as info:
            layer.load_state_dict({**layer.state_dict(), "phi": bad})
        assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="store_filters must be true or false"):
        build_layer("stu", dim=6, seq_len=20, num_filters=4, store_filters="yes")
