"""STU / STU-T: FFT convolution against a direct O(T^2) reference, properties, and exact decoding."""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spectralds.filters import spectral_filters
from spectralds.layers import futurefill, stu
from spectralds.layers.registry import build_layer
from spectralds.layers.stu import STU, STUTensordot
from spectralds.ops import fft_conv
from spectralds.ops.fft_conv import alternating

F64 = torch.float64
LAYERS = [STU, STUTensordot]


@pytest.fixture(scope="module", autouse=True)
def filter_cache(tmp_path_factory):
    """Keep the filters computed here out of the user's cache."""
    old = os.environ.get("SPECTRALDS_CACHE_DIR")
    os.environ["SPECTRALDS_CACHE_DIR"] = str(tmp_path_factory.mktemp("filters"))
    yield
    if old is None:
        os.environ.pop("SPECTRALDS_CACHE_DIR")
    else:
        os.environ["SPECTRALDS_CACHE_DIR"] = old


def make(cls, dim=3, seq_len=40, num_filters=4, dim_out=None, variant="hankel", dtype=F64, seed=0):
    torch.manual_seed(seed)
    return cls(dim, seq_len, num_filters=num_filters, dim_out=dim_out, variant=variant).to(dtype)


def force_path(layer, kernel_path: bool | None):
    """Pin the STU sequence arrangement (kernel or project); None keeps the automatic choice."""
    if isinstance(layer, STU) and kernel_path is not None:
        layer.conv_path = "kernel" if kernel_path else "project"
    return layer


def causal_conv_direct(u: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """y[b, t, c, k] = sum_{s<=t} kernel[s, k] u[b, t-s, c]: a plain double loop over lags, float64."""
    y = torch.zeros(*u.shape, kernel.shape[1], dtype=F64)
    for s in range(u.shape[1]):
        y[:, s:] += u[:, : u.shape[1] - s, :, None].double() * kernel[s].double()
    return y


def reference(layer, x: torch.Tensor) -> torch.Tensor:
    """The layer's output by direct convolution, written from the defining formulas (float64)."""
    T = x.shape[1]
    phi = layer.phi[:T].double()
    sgn = alternating(T, dtype=F64)[None, :, None, None]
    x = x.double()
    if isinstance(layer, STU):
        u_plus = causal_conv_direct(x, phi)  # (B, T, dim, K)
        # The "-" branch in its sign-flip form sgn . (phi * (sgn . x)): equal to convolving with (-1)^s phi.
        u_minus = sgn * causal_conv_direct(sgn[..., 0] * x, phi)
        return torch.einsum("btdk,kdo->bto", u_plus, layer.M_phi_plus.double()) + torch.einsum(
            "btdk,kdo->bto", u_minus, layer.M_phi_minus.double()
        )
    x_proj = x @ layer.M_inputs.double()
    alt = phi * alternating(T, dtype=F64)[:, None]
    kernel = phi @ layer.M_filters_plus.double() + alt @ layer.M_filters_minus.double()  # (T, dim_out)
    y = torch.zeros_like(x_proj)
    for s in range(T):
        y[:, s:] += x_proj[:, : T - s] * kernel[s]
    return y


def decode(layer, x, prompt_len, method):
    layer.set_decode_method(method)
    y, state = layer.prefill(x[:, :prompt_len])
    outs = [y]
    for t in range(prompt_len, x.shape[1]):
        y_t, state = layer.step(x[:, t], state)
        outs.append(y_t[:, None])
    return torch.cat(outs, dim=1)


def assert_close_scaled(actual, expected, rtol):
    """Max abs error within rtol times the largest |expected| (FFT errors scale with the whole output)."""
    scale = expected.abs().max().item() or 1.0
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol:g} * {scale:.3g}"


# ---- FFT convolution == direct convolution ----------------------------------------------------------


@pytest.mark.parametrize("kernel_path", [True, False])
@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("variant", ["hankel", "hankel_L"])
def test_forward_matches_direct_convolution(cls, variant, kernel_path):
    layer = force_path(make(cls, dim=3, dim_out=5, variant=variant), kernel_path)
    for T in (1, 2, 17, 40):
        x = torch.randn(2, T, 3, dtype=F64)
        assert_close_scaled(layer(x), reference(layer, x), 1e-12)


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(1, 3),
    T=st.integers(1, 33),
    extra=st.integers(0, 9),
    dim=st.integers(1, 4),
    K=st.integers(1, 5),
    double=st.booleans(),
    variant=st.sampled_from(["hankel", "hankel_L", "tensor"]),
    kernel_path=st.booleans(),
    tensordot=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_fft_matches_direct(batch, T, extra, dim, K, double, variant, kernel_path, tensordot, seed):
    cls = STUTensordot if tensordot else STU
    dtype = F64 if double else torch.float32
    layer = make(cls, dim, T + extra, min(K, T + extra), variant=variant, dtype=dtype, seed=seed)
    force_path(layer, kernel_path)
    x = torch.randn(batch, T, dim, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (batch, T, dim)
    assert_close_scaled(y, reference(layer, x), 1e-11 if double else 2e-5)


@settings(max_examples=15, deadline=None)
@given(
    T=st.integers(2, 40),
    t0=st.integers(0, 39),
    tensordot=st.booleans(),
    kernel_path=st.booleans(),
    variant=st.sampled_from(["hankel", "hankel_L", "tensor"]),
)
def test_property_causality(T, t0, tensordot, kernel_path, variant):
    t0 = t0 % T
    layer = force_path(make(STUTensordot if tensordot else STU, seq_len=40, variant=variant), kernel_path)
    x = torch.randn(2, T, 3, dtype=F64)
    x2 = x.clone()
    x2[:, t0] += torch.randn(2, 3, dtype=F64)
    y, y2 = layer(x), layer(x2)
    if t0:
        assert (y[:, :t0] - y2[:, :t0]).abs().max().item() <= 1e-12 * y.abs().max().item()
    assert (y[:, t0] - y2[:, t0]).abs().max() > 1e-6  # lag 0 is included


@settings(max_examples=15, deadline=None)
@given(
    T=st.integers(1, 30),
    shift=st.integers(1, 10),
    tensordot=st.booleans(),
    kernel_path=st.booleans(),
    variant=st.sampled_from(["hankel", "hankel_L", "tensor"]),
)
def test_property_time_invariance(T, shift, tensordot, kernel_path, variant):
    layer = force_path(make(STUTensordot if tensordot else STU, seq_len=40, variant=variant), kernel_path)
    x = torch.randn(2, T, 3, dtype=F64)
    shifted = torch.cat([torch.zeros(2, shift, 3, dtype=F64), x], dim=1)
    y, y_shifted = layer(x), layer(shifted)
    scale = y.abs().max().item()
    assert y_shifted[:, :shift].abs().max().item() <= 1e-12 * scale
    assert (y_shifted[:, shift:] - y).abs().max().item() <= 1e-12 * scale


def test_minus_branch_spectrum_is_the_shifted_plus_spectrum():
    layer = make(STU, seq_len=40)
    for lo, hi, n in [(0, 40, 128), (1, 31, 64), (4, 9, 16), (7, 8, 2)]:
        bank = layer._kernel(hi, F64)[lo:]
        expected = torch.fft.rfft(bank, n=n, dim=0)
        assert (layer._kernel_spectrum(lo, hi, n, F64) - expected).abs().max() < 1e-12


def test_kernel_path_chunked_gradients_match_reference(monkeypatch):
    # Several frequency chunks, so the checkpointed (recomputed in backward) branch runs.
    monkeypatch.setattr(fft_conv, "KERNEL_CHUNK_BYTES", 3 * 16 * 4 * 16)
    for kernel_path in (True, False):
        layer = force_path(make(STU, dim=3, dim_out=4, seq_len=30), kernel_path)
        x = torch.randn(2, 30, 3, dtype=F64, requires_grad=True)
        weights = torch.randn(2, 30, 4, dtype=F64)
        grads = torch.autograd.grad((layer(x) * weights).sum(), [x, layer.M_phi_plus, layer.M_phi_minus])
        expected = torch.autograd.grad(
            (reference(layer, x) * weights).sum(), [x, layer.M_phi_plus, layer.M_phi_minus]
        )
        for g, e in zip(grads, expected, strict=True):
            assert_close_scaled(g, e, 1e-11)


def test_tensordot_gradients_match_reference():
    layer = make(STUTensordot, dim=3, dim_out=4, seq_len=30)
    x = torch.randn(2, 30, 3, dtype=F64, requires_grad=True)
    params = [x, layer.M_inputs, layer.M_filters_plus, layer.M_filters_minus]
    grads = torch.autograd.grad(layer(x).square().sum(), params)
    expected = torch.autograd.grad(reference(layer, x).square().sum(), params)
    for g, e in zip(grads, expected, strict=True):
        assert_close_scaled(g, e, 1e-11)


# ---- STU-T kernel -----------------------------------------------------------------------------------


def test_tensordot_kernel_keeps_odd_lags():
    """Impulse response per channel == phi @ M_filters_plus + alt(phi) @ M_filters_minus."""
    layer = make(STUTensordot, dim=4, seq_len=40)
    with torch.no_grad():
        layer.M_inputs.copy_(torch.eye(4, dtype=F64))
    impulse = torch.zeros(4, 40, 4, dtype=F64)
    impulse[torch.arange(4), 0, torch.arange(4)] = 1.0
    response = layer(impulse)[torch.arange(4), :, torch.arange(4)].T  # (40, 4): channel c's kernel
    phi = layer.phi.double()
    alt = phi * alternating(40, dtype=F64)[:, None]
    expected = phi @ layer.M_filters_plus + alt @ layer.M_filters_minus
    assert (response - expected).abs().max() < 1e-12
    assert (layer.channel_filters() - expected).abs().max() < 1e-12
    # The published shared-projection form keeps only even lags; ours must not.
    assert response[1::2].abs().max() > 1e-3 * response.abs().max()


# ---- decoding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["naive", "futurefill"])
@pytest.mark.parametrize("cls", LAYERS)
def test_decoding_matches_forward_float64(cls, method):
    layer = make(cls, dim=3, dim_out=2, seq_len=70)
    x = torch.randn(3, 70, 3, dtype=F64)
    y = layer(x)
    for prompt_len in (0, 1, 7, 16, 33, 69, 70):
        out = decode(layer, x, prompt_len, method)
        assert (out - y).abs().max().item() <= 1e-10 * y.abs().max().item(), prompt_len


@pytest.mark.parametrize("cls", LAYERS)
def test_futurefill_fft_blocks_match_forward(cls, monkeypatch):
    monkeypatch.setattr(futurefill, "_DIRECT_BLOCK", 1)  # every block of 2+ tokens goes through the FFT
    layer = make(cls, dim=2, seq_len=100)
    x = torch.randn(2, 100, 2, dtype=F64)
    y = layer(x)
    for prompt_len in (0, 5, 64):
        out = decode(layer, x, prompt_len, "futurefill")
        assert (out - y).abs().max().item() <= 1e-10 * y.abs().max().item()


@pytest.mark.parametrize("method", ["naive", "futurefill"])
@pytest.mark.parametrize("cls", LAYERS)
def test_decoding_matches_forward_float32(cls, method):
    layer = make(cls, dim=4, seq_len=64, dtype=torch.float32)
    x = torch.randn(2, 64, 4)
    y = layer(x)
    for prompt_len in (0, 3, 32):
        out = decode(layer, x, prompt_len, method)
        assert out.dtype == torch.float32
        assert_close_scaled(out, y, 1e-5)


@settings(max_examples=10, deadline=None)
@given(
    batch=st.integers(1, 3),
    seq_len=st.integers(1, 48),
    prompt=st.integers(0, 48),
    tensordot=st.booleans(),
    futurefill=st.booleans(),
    variant=st.sampled_from(["hankel", "hankel_L"]),
)
def test_property_decoding_matches_forward(batch, seq_len, prompt, tensordot, futurefill, variant):
    layer = make(STUTensordot if tensordot else STU, dim=2, seq_len=seq_len, num_filters=1, variant=variant)
    x = torch.randn(batch, seq_len, 2, dtype=F64)
    out = decode(layer, x, min(prompt, seq_len), "futurefill" if futurefill else "naive")
    assert_close_scaled(out, layer(x), 1e-10)


def test_decode_method_from_layer_attribute_and_futurefill_cache_size():
    layer = make(STUTensordot, seq_len=64)
    assert layer.decode_method == "futurefill"
    _, state = layer.prefill(torch.randn(2, 50, 3, dtype=F64))
    assert state.method == "futurefill" and state.pos == 50
    assert state.inputs.shape[-1] <= 16  # the prompt itself is not cached
    layer.set_decode_method("naive")
    assert layer.init_state(2).method == "naive"
    layer.decode_method = "fast"
    with pytest.raises(ValueError, match="decode method"):
        layer.init_state(2)
    with pytest.raises(ValueError, match="decode method"):
        layer.set_decode_method("fast")


@pytest.mark.parametrize("method", ["naive", "futurefill"])
def test_decoding_past_seq_len_raises(method):
    layer = make(STU, seq_len=8)
    layer.set_decode_method(method)
    _, state = layer.prefill(torch.randn(1, 8, 3, dtype=F64))
    with pytest.raises(ValueError, match="past seq_len"):
        layer.step(torch.randn(1, 3, dtype=F64), state)
    with pytest.raises(ValueError, match="x_t of shape"):
        layer.step(torch.randn(2, 3, dtype=F64), layer.init_state(1))


# ---- construction, dtypes, errors --------------------------------------------------------------------


def test_registry_attributes_and_checkpoint_contents():
    layer = build_layer("stu", dim=3, seq_len=32, num_filters=5, dim_out=4)
    assert isinstance(layer, STU)
    attributes = (layer.dim, layer.dim_out, layer.seq_len, layer.num_filters, layer.variant)
    assert attributes == (3, 4, 32, 5, "hankel")
    assert layer.M_phi_plus.shape == layer.M_phi_minus.shape == (5, 3, 4)
    assert set(layer.state_dict()) == {"M_phi_plus", "M_phi_minus"}  # filters are recomputed, not saved
    assert layer.phi.dtype == torch.float32
    assert torch.equal(layer.phi, spectral_filters(32, 5, "hankel").float())
    t_layer = build_layer("stu_t", dim=3, seq_len=32, num_filters=5, dim_out=4)
    assert isinstance(t_layer, STUTensordot)
    assert set(t_layer.state_dict()) == {"M_inputs", "M_filters_plus", "M_filters_minus"}
    assert t_layer.M_inputs.shape == (3, 4) and t_layer.M_filters_minus.shape == (5, 4)


def test_variant_options_and_explicit_filters():
    layer = STU(2, 24, num_filters=3, use_hankel_L=True)
    assert layer.variant == "hankel_L"
    assert torch.equal(layer.phi, spectral_filters(24, 3, "hankel_L").float())
    custom = torch.randn(24, 3)
    assert torch.equal(STU(2, 24, num_filters=3, filters=custom).phi, custom)
    with pytest.raises(ValueError, match="conflicts"):
        STU(2, 24, num_filters=3, variant="tensor", use_hankel_L=True)
    with pytest.raises(ValueError, match="filters must be"):
        STU(2, 24, num_filters=3, filters=torch.randn(23, 3))
    with pytest.raises(ValueError, match="num_filters"):
        STU(2, 4, num_filters=5)
    with pytest.raises(ValueError, match="variant"):
        STU(2, 24, num_filters=3, variant="bogus")


@pytest.mark.parametrize("cls", LAYERS)
def test_tensor_variant(cls):
    layer = make(cls, seq_len=36, num_filters=4, variant="tensor")
    x = torch.randn(2, 36, 3, dtype=F64)
    assert_close_scaled(layer(x), reference(layer, x), 1e-12)
    assert_close_scaled(decode(layer, x, 9, "futurefill"), layer(x), 1e-10)


def test_too_long_input_raises():
    layer = make(STU, seq_len=8)
    with pytest.raises(ValueError, match="exceeds the layer's seq_len 8"):
        layer(torch.randn(1, 9, 3, dtype=F64))
    with pytest.raises(ValueError, match="expected input of shape"):
        layer(torch.randn(1, 4, 2, dtype=F64))
    assert layer(torch.randn(2, 0, 3, dtype=F64)).shape == (2, 0, 3)


@pytest.mark.parametrize("kernel_path", [True, False])
@pytest.mark.parametrize("cls", LAYERS)
def test_bf16_autocast_convolves_in_float32(cls, kernel_path):
    layer = force_path(make(cls, dim=8, seq_len=64, dtype=torch.float32), kernel_path)
    x = torch.randn(2, 64, 8)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float32
    assert_close_scaled(y, expected, 3e-2)  # only the projection before the convolution is bf16
    y16 = layer(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    assert_close_scaled(y16, expected, 3e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decoded = decode(layer, x, 40, "futurefill")
    assert decoded.dtype == torch.float32
    assert_close_scaled(decoded, expected, 3e-2)


def test_half_precision_cast_keeps_float32_filters():
    layer = make(STU, dtype=torch.float32).bfloat16()
    assert layer.M_phi_plus.dtype == torch.bfloat16 and layer.phi.dtype == torch.float32
    assert layer(torch.randn(1, 10, 3, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ---- filter spectrum cache ---------------------------------------------------------------------------


def test_filter_spectra_are_computed_once_per_fft_length(monkeypatch):
    calls = []
    original = stu.filter_spectra
    monkeypatch.setattr(stu, "filter_spectra", lambda *a: calls.append(a[1:]) or original(*a))
    layer = make(STU, seq_len=40)
    x = torch.randn(2, 40, 3, dtype=F64)
    y = layer(x)
    assert torch.equal(layer(x), y) and len(calls) == 1  # same length: served from the cache
    layer(x[:, :20])
    assert len(calls) == 2  # another FFT length: one more entry
    for _ in range(3):
        layer(x[:, :20])
    assert len(calls) == 2


def test_filter_spectrum_cache_follows_the_filters():
    layer = make(STU, seq_len=40)
    x = torch.randn(2, 40, 3, dtype=F64)
    layer(x)
    with torch.no_grad():
        layer.phi.mul_(2)  # in place: the version counter tells the cache
    assert_close_scaled(layer(x), reference(layer, x), 1e-12)
    layer.phi = torch.randn(40, 4, dtype=F64)  # replaced (as tools/length_generalization.py does)
    assert_close_scaled(layer(x), reference(layer, x), 1e-12)
    layer.float()  # moved / cast: the float64 spectra are not reused for float32 inputs
    assert_close_scaled(layer(x.float()), reference(layer, x), 2e-5)


def test_stu_t_caches_only_the_fixed_filter_spectra():
    """The STU-T kernel depends on M_filters: a changed parameter must change the output."""
    layer = make(STUTensordot, dim=3, seq_len=30)
    x = torch.randn(2, 30, 3, dtype=F64)
    layer(x)
    with torch.no_grad():
        layer.M_filters_minus.add_(torch.randn_like(layer.M_filters_minus))
    assert_close_scaled(layer(x), reference(layer, x), 1e-12)
    assert all(not s.requires_grad for s in layer._spectra.values())


@pytest.mark.parametrize("cls", LAYERS)
def test_spectra_cached_under_inference_mode_do_not_break_training(cls):
    layer = make(cls, dim=3, seq_len=30)
    x = torch.randn(2, 30, 3, dtype=F64)
    with torch.inference_mode():
        layer(x)
    loss = layer(x).square().sum()
    loss.backward()  # an inference tensor saved for backward would raise here
    assert all(p.grad is not None for p in layer.parameters())
