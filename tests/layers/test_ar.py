"""The STU's autoregressive terms (`ar_order`): parallel scan vs loop, decoding, distillation."""

import pytest
import torch

from spectralds.distill.convert import convert_stu_layers, lds_from_stu
from spectralds.distill.lds_file import LDSFit
from spectralds.errors import UserError
from spectralds.layers import build_layer, layer_specs, restore_layers
from spectralds.layers.ar import ARDecodeState, AutoRegressive, LDSWithAR
from spectralds.ops.ar_scan import ar_ref

F64 = torch.float64


def randomize_ar(layer: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.ar.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale / p.shape[-1] ** 0.5)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", [1, 2, 7, 64, 100])
def test_parallel_scan_matches_the_loop_float64(order, steps):
    ar = AutoRegressive(3, 4, order).double()
    randomize_ar(torch.nn.ModuleDict({"ar": ar}), scale=0.9, seed=order)
    x, s = torch.randn(2, steps, 3, dtype=F64), torch.randn(2, steps, 4, dtype=F64)
    ref = ar_ref(x, s, ar.M_u, ar.M_y)
    assert torch.allclose(ar(x, s), ref, rtol=1e-11, atol=1e-11 * ref.abs().max().item())


def test_parallel_scan_gradients_match_the_loop():
    ar = AutoRegressive(2, 3, 2).double()
    randomize_ar(torch.nn.ModuleDict({"ar": ar}), scale=0.8)
    x = torch.randn(2, 37, 2, dtype=F64, requires_grad=True)
    s = torch.randn(2, 37, 3, dtype=F64)
    w = torch.randn(2, 37, 3, dtype=F64)
    grads = []
    for fn in (ar, lambda a, b: ar_ref(a, b, ar.M_u, ar.M_y)):
        (fn(x, s) * w).sum().backward()
        grads.append([x.grad.clone(), ar.M_u.grad.clone(), ar.M_y.grad.clone()])
        x.grad = ar.M_u.grad = ar.M_y.grad = None
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["stu", "stu_t"])
def test_stu_with_ar_is_the_spectral_part_plus_the_recursion(kind):
    layer = build_layer(kind, dim=3, dim_out=2, seq_len=50, num_filters=4, ar_order=2).double()
    randomize_ar(layer)
    x = torch.randn(2, 41, 3, dtype=F64)
    spectral = layer._sequence_conv(x, 41)
    assert torch.allclose(layer(x), ar_ref(x, spectral, layer.ar.M_u, layer.ar.M_y), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("kind", ["stu", "stu_t"])
def test_ar_order_zero_is_todays_layer_bit_for_bit(kind):
    torch.manual_seed(5)
    plain = build_layer(kind, dim=4, seq_len=32, num_filters=3)
    torch.manual_seed(5)
    zero = build_layer(kind, dim=4, seq_len=32, num_filters=3, ar_order=0)
    assert zero.ar is None and list(plain.state_dict()) == list(zero.state_dict())
    x = torch.randn(2, 20, 4)
    assert torch.equal(plain(x), zero(x))
    with_ar = build_layer(kind, dim=4, seq_len=32, num_filters=3, ar_order=2)
    assert set(with_ar.state_dict()) - set(plain.state_dict()) == {"ar.M_u", "ar.M_y"}
    assert torch.equal(with_ar.ar(x, zero(x)), zero(x))  # zero init: a fresh AR layer is the plain layer


@pytest.mark.parametrize("kind", ["stu", "stu_t"])
@pytest.mark.parametrize("method", ["naive", "futurefill"])
@pytest.mark.parametrize("prompt", [0, 1, 9])
def test_decoding_matches_forward(kind, method, prompt):
    layer = build_layer(kind, dim=3, seq_len=40, num_filters=4, ar_order=3).double()
    layer.set_decode_method(method)
    randomize_ar(layer)
    x = torch.randn(2, 30, 3, dtype=F64)
    ys, state = ([], layer.init_state(2, dtype=F64)) if prompt == 0 else layer.prefill(x[:, :prompt])
    ys = [ys] if prompt else []
    assert isinstance(state, ARDecodeState) and state.outputs.shape == (2, 3, 3)
    for t in range(prompt, 30):
        y_t, state = layer.step(x[:, t], state)
        ys.append(y_t[:, None])
    assert torch.allclose(torch.cat(ys, 1), layer(x), rtol=1e-10, atol=1e-12)


def exact_fit(seq_len: int, K: int, h: int = 5) -> tuple[torch.Tensor, LDSFit]:
    """Filters that an LDS realizes exactly, and that LDS: phi_k(t) = sum_j c_jk b_j a_j^t; the "-"
    branch (-1)^t phi_k(t) is realized by the mirrored poles -a_j."""
    g = torch.Generator().manual_seed(1)
    a = 0.99 * (2 * torch.rand(h, generator=g, dtype=F64) - 1)
    b, c = torch.randn(h, generator=g, dtype=F64), torch.randn(h, K, generator=g, dtype=F64)
    phi = (a ** torch.arange(seq_len, dtype=F64)[:, None] * b) @ c
    zero = torch.zeros_like(c)
    C = torch.cat([torch.cat([c, zero], 1), torch.cat([zero, c], 1)])
    fit = LDSFit(torch.cat([a, -a]), torch.cat([b, b]), C, seq_len, K, "hankel", "test")
    return phi, fit


@pytest.mark.parametrize("kind", ["stu", "stu_t"])
def test_distilled_layer_with_ar_matches_its_parent_float64(kind):
    phi, fit = exact_fit(64, 4)
    stu = build_layer(kind, dim=3, seq_len=64, num_filters=4, filters=phi, ar_order=2).double()
    stu.phi.copy_(phi)  # the layer stores its filters in float32: give it the exact float64 ones back
    randomize_ar(stu)
    lds = lds_from_stu(stu, fit)
    assert isinstance(lds, LDSWithAR) and lds.run_dtype == F64
    assert torch.equal(lds.ar.M_y, stu.ar.M_y) and torch.equal(lds.ar.M_u, stu.ar.M_u)
    x = torch.randn(2, 64, 3, dtype=F64)
    ref = stu(x)
    out = lds(x)
    assert ((out - ref).pow(2).sum() / ref.pow(2).sum()).item() < 1e-24  # float64 FFT rounding only
    # and its O(1) decoding (LDS state + AR history) gives the same outputs
    y, state = lds.prefill(x[:, :5])
    ys = [y]
    for t in range(5, 64):
        y_t, state = lds.step(x[:, t], state)
        ys.append(y_t[:, None])
    assert torch.allclose(torch.cat(ys, 1), ref, rtol=1e-10, atol=1e-12)


def test_convert_measures_the_whole_layer_and_checkpoints_round_trip():
    phi, fit = exact_fit(48, 3)
    model = torch.nn.Sequential(build_layer("stu", dim=4, seq_len=48, num_filters=3, filters=phi,
                                            ar_order=2)).double()
    model[0].phi.copy_(phi)
    randomize_ar(model[0])
    x = torch.randn(1, 48, 4, dtype=F64)
    ref = model(x)
    reports = convert_stu_layers(model, lambda _: fit, max_error=1e-10)
    assert isinstance(model[0], LDSWithAR) and reports[0].rel_mse < 1e-10  # the probe runs in float32
    specs, state = layer_specs(model), model.state_dict()
    assert specs["0"]["name"] == "lds_ar" and specs["0"]["ar_order"] == 2
    fresh = torch.nn.Sequential(build_layer("stu", dim=4, seq_len=48, num_filters=3, ar_order=2))
    assert restore_layers(fresh, specs) == ["0"]
    fresh.load_state_dict(state)
    assert torch.allclose(fresh(x), ref, rtol=1e-10, atol=1e-12)


def test_a_wrong_ar_term_is_measured():
    # carrying the AR weights matters: the probe sees a layer whose AR terms were dropped
    phi, fit = exact_fit(48, 3)
    stu = build_layer("stu", dim=4, seq_len=48, num_filters=3, filters=phi, ar_order=1).double()
    randomize_ar(stu)
    lds = lds_from_stu(stu, fit)
    with torch.no_grad():
        lds.ar.M_y.zero_()
    from spectralds.distill.convert import layer_error

    assert layer_error(stu, lds) > 1e-6


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_bad_ar_order(bad):
    with pytest.raises(UserError):
        build_layer("stu", dim=2, seq_len=8, num_filters=2, ar_order=bad)


@pytest.mark.parametrize("pattern", [["stu"], ["stu_t", "attn"]])
def test_language_model_with_ar_layers_decodes_like_its_forward(pattern):
    from spectralds.models.lm import LanguageModel

    torch.manual_seed(0)
    kwargs = {name: {"ar_order": 2} for name in ("stu", "stu_t")} | {"attn": {"num_heads": 2}}
    model = LanguageModel(vocab_size=11, dim=16, num_layers=2, layer_pattern=pattern, seq_len=24,
                          num_filters=4, layer_kwargs={k: v for k, v in kwargs.items() if k in pattern},
                          mlp_ratio=2.0).double().eval()
    for block in model.blocks:
        if getattr(block.mixer, "ar", None) is not None:
            randomize_ar(block.mixer)
    idx = torch.randint(0, 11, (2, 20))
    with torch.no_grad():
        full = model(idx)
        logits, states = model.prefill(idx[:, :7])  # the logits of the last prompt position
        steps = [logits[:, None]]
        for t in range(7, 20):
            step_logits, states = model.step(idx[:, t], states)
            steps.append(step_logits[:, None])
    assert torch.allclose(torch.cat(steps, 1), full[:, 6:], rtol=1e-9, atol=1e-10)
