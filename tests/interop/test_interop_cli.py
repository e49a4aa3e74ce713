"""`spectralds import-model` end to end, its one-line errors, and the flash-stu-2 export (round trip)."""

import json

import pytest
import torch
from cli_helpers import one_line_error, run_cli
from interop_reference import fs2_config, hankel_bank, paper_config, random_state_dict, write_source

from spectralds.checkpoint_io import load_model, read_checkpoint, tokenizer_spec
from spectralds.errors import UserError
from spectralds.interop.flash_stu import build_model, export_flash_stu2, import_flash_stu
from spectralds.models import LanguageModel

TOKENS = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))


def fs2_source(directory, dtype=torch.float32, **over):
    cfg = fs2_config(vocab_size=256, **over)
    sd = random_state_dict(cfg, 7)
    bank = hankel_bank(cfg["seq_len"], cfg["num_eigh"], cfg["use_hankel_L"])
    write_source(directory, cfg, {**sd, "phi": bank}, dtype=dtype)
    return directory


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens)


def test_import_model_cli_end_to_end(cli_env, capsys, tmp_path):
    src = fs2_source(tmp_path / "src")
    assert run_cli(["import-model", str(src), "--out", "m.ckpt"]) == 0
    out = capsys.readouterr().out
    for text in ("source: flash-stu-2", "filters: ours up to order and sign", "parameters:",
                 "layer_pattern ['stu_t', 'attn']", "tokenizer: byte", "wrote m.ckpt"):
        assert text in out
    checkpoint = read_checkpoint("m.ckpt")
    assert tokenizer_spec(checkpoint) == "byte"
    model = load_model("m.ckpt")
    expected = build_model(import_flash_stu(src), torch.float32, "cpu")
    assert torch.equal(logits(model), logits(expected))
    assert run_cli(["generate", "--ckpt", "m.ckpt", "--prompt", "ab", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("ab")


def test_import_model_records_a_tokenizer_file(cli_env, capsys, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.add_tokens(["a", "b", "c"])
    tok.save(str(tmp_path / "tokenizer.json"))
    src = fs2_source(tmp_path / "src")
    args = ["import-model", str(src), "--out", "m.ckpt", "--tokenizer", str(tmp_path / "tokenizer.json")]
    assert run_cli(args) == 0
    assert tokenizer_spec(read_checkpoint("m.ckpt")) == str((tmp_path / "tokenizer.json").resolve())


def test_import_model_bad_inputs_are_one_line(cli_env, capsys, tmp_path):
    src = fs2_source(tmp_path / "src")
    base = ["import-model", str(src), "--out", "m.ckpt"]
    assert "--format" in one_line_error(capsys, [*base, "--format", "x"])
    assert "no field 'dim'" in one_line_error(capsys, [*base, "--format", "spectralds-paper"])
    err = one_line_error(capsys, ["import-model", str(src / "model.safetensors"), "--out",
                                  str(src / "model.safetensors")])
    assert "source's own file" in err
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "n_layers"}))
    assert "'n_layers'" in one_line_error(capsys, ["import-model", str(src), "--out", "m.ckpt"])
    (src / "config.json").write_text(json.dumps({**cfg, "stu_enable_mlp_sandwich": True}))
    assert "stu_enable_mlp_sandwich" in one_line_error(capsys, ["import-model", str(src), "--out", "m.ckpt"])
    (src / "config.json").write_text(json.dumps({**cfg, "vocab_size": 300}))
    assert "--tokenizer" in one_line_error(capsys, ["import-model", str(src), "--out", "m.ckpt"])
    assert "does not exist" in one_line_error(capsys, ["import-model", "nowhere", "--out", "m.ckpt"])
    (tmp_path / "a_file").write_text("")
    assert "not a directory" in one_line_error(capsys, [*base[:2], "--out", str(tmp_path / "a_file" / "m")])


def test_paper_source_without_filters_names_the_option(cli_env, capsys, tmp_path):
    cfg = paper_config(vocab_size=256, use_attn=False)
    path = write_source(tmp_path / "p", cfg, random_state_dict(cfg, 2))
    assert "--filters" in one_line_error(capsys, ["import-model", str(path), "--out", "m.ckpt"])
    assert run_cli(["import-model", str(path), "--out", "m.ckpt", "--filters", "eigh"]) == 0


ROUND_TRIPS = [{}, {"use_attn": False, "use_approx": False}, {"use_hankel_L": True},
               {"bias": True, "window_size": 63}]


@pytest.mark.parametrize("over", ROUND_TRIPS, ids=["hybrid", "stu", "hankel_L", "bias"])
def test_export_import_round_trip_is_the_identity(tmp_path, over):
    first = import_flash_stu(fs2_source(tmp_path / "src", **over))
    model = build_model(first, torch.float32, "cpu")
    export_flash_stu2(model, tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"config.json", "model.safetensors",
                                                                "spectral_filters.pt"}
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert {"lm_head.weight", "tok_emb.weight", "phi"} <= set(f.keys())
    second = import_flash_stu(tmp_path / "out")
    assert second.match.ours and second.match.perm.tolist() == list(range(6))
    assert second.hparams == first.hparams
    again = build_model(second, torch.float32, "cpu")
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    assert torch.equal(logits(again), logits(model))


def _gelu_model(share=True, **kw):
    """A model flash-stu-2 can express unless `kw` changes that (STU-T branches sharing one projection)."""
    base = {"vocab_size": 64, "dim": 16, "num_layers": 2, "seq_len": 32, "num_filters": 4, "mlp_ratio": 2.0,
            "layer_pattern": ["stu_t", "attn"], "mlp_activation": "gelu_tanh", "norm_eps": None,
            "layer_kwargs": {"attn": {"num_heads": 2, "positions": "alibi", "alibi_slope_scale": 0.25}}}
    model = LanguageModel(**{**base, **kw})
    for block in model.blocks:
        if share and hasattr(block.mixer, "M_filters_minus"):
            block.mixer.M_filters_minus.data.copy_(block.mixer.M_filters_plus.data)
    return model


def test_export_refuses_what_flash_stu2_cannot_express(tmp_path):
    cases = [
        (LanguageModel(vocab_size=64, dim=16, num_layers=1, seq_len=32, num_filters=4), "'silu' MLP gate"),
        (_gelu_model(layer_kwargs={"attn": {"num_heads": 2}}), "positions 'rope'"),
        (_gelu_model(tie_embeddings=False), "untied head"),
        (_gelu_model(norm_eps=1e-6), "norm_eps"),
        (_gelu_model(layer_pattern=["attn", "stu_t"]), "layer pattern"),
        (_gelu_model(mlp_ratio=1.5), "whole multiple"),
        (_gelu_model(layer_pattern=["stu_t"], layer_kwargs={"stu_t": {"ar_order": 2}}), "autoregressive"),
    ]
    cases.append((_gelu_model(share=False), "M_filters_minus != M_filters_plus"))
    for model, feature in cases:
        with pytest.raises(UserError, match=feature) as err:
            export_flash_stu2(model, tmp_path / "out")
        assert str(err.value).startswith("flash-stu-2 cannot express") and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_export_never_writes_into_a_non_empty_directory(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not an empty directory"):
        export_flash_stu2(_gelu_model(), tmp_path / "out")
    export_flash_stu2(_gelu_model(), tmp_path / "empty")  # the same model is expressible
    assert (tmp_path / "empty" / "config.json").is_file()


def test_bfloat16_round_trip_carries_its_bank_and_eps(tmp_path):
    """A bfloat16 flash-stu-2 model: eps 2^-7 and a bf16-rounded bank (carried); exported back as bfloat16."""
    src = fs2_source(tmp_path / "src", dtype=torch.bfloat16, torch_dtype="bfloat16")
    first = import_flash_stu(src)
    assert not first.match.ours and first.hparams["norm_eps"] == 2.0**-7
    model = build_model(first, torch.float32, "cpu")
    export_flash_stu2(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    second = import_flash_stu(tmp_path / "out")
    assert second.hparams == first.hparams
    again = build_model(second, torch.float32, "cpu")
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    assert torch.equal(logits(again), logits(model))
    model.blocks[0].mlp.w1.weight.data[0, 0] += 1e-3  # no longer a bfloat16 number
    with pytest.raises(UserError, match="without rounding"):
        export_flash_stu2(model, tmp_path / "out2")


def test_imported_checkpoint_distills(cli_env, capsys, tmp_path):
    """An imported STU model goes through STU -> LDS conversion like one of ours (its filters are ours
    after the measured re-indexing), and the LDS model computes the same logits."""
    from spectralds.distill import fit_filters
    from spectralds.distill.convert import convert_stu_layers

    src = fs2_source(tmp_path / "src", use_attn=False)
    assert run_cli(["import-model", str(src), "--out", "m.ckpt"]) == 0
    model = load_model("m.ckpt")
    before = logits(model)
    fit = fit_filters(64, 6, 16, progress=False)
    reports = convert_stu_layers(model, lambda stu: fit, max_error=1e-6)
    assert len(reports) == 2
    assert float((logits(model) - before).abs().max() / before.abs().max()) < 1e-4
