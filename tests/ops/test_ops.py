"""Every fast op of spectralds.ops against its plain reference: forward and backward, float64."""

import pytest
import torch

from spectralds.ops import ar_scan, fft_conv, lds_conv, lds_scan
from spectralds.ops.fft_conv import (
    alternating,
    causal_conv_ref,
    fft_size,
    filter_spectra,
    filter_spectra_ref,
    filter_sum,
    filter_sum_ref,
    kernel_mix,
    kernel_mix_ref,
    real_fft,
    real_fft_ref,
)
from spectralds.ops.spectrum_cache import SpectrumCache

F64, C128 = torch.float64, torch.complex128


def grads(fn, inputs, weight):
    """Gradients of Re(sum(fn(*inputs) * weight)) w.r.t. inputs (a real loss of a complex output)."""
    out = fn(*inputs)
    return out, torch.autograd.grad((out * weight).real.sum(), inputs)


def assert_close(actual, expected, tol=1e-12):
    scale = max(expected.abs().max().item(), 1.0)
    assert (actual - expected).abs().max().item() <= tol * scale


@pytest.mark.parametrize("length, n", [(1, 2), (5, 8), (8, 8), (3, 16), (37, 128)])
def test_real_fft_matches_rfft(length, n):
    z = torch.randn(2, 3, length, dtype=F64, requires_grad=True)
    w = torch.randn(2, 3, n // 2 + 1, dtype=C128)
    out, (g,) = grads(lambda z: real_fft(z, n), [z], w)
    ref, (g_ref,) = grads(lambda z: real_fft_ref(z, n), [z], w)
    assert_close(out, ref)
    assert_close(g, g_ref)


def test_filter_sum_matches_einsum():
    zf = torch.randn(2, 5, 3, 9, dtype=C128, requires_grad=True)
    spectrum = torch.randn(9, 5, dtype=C128)
    w = torch.randn(2, 3, 9, dtype=C128)
    out, (g,) = grads(lambda z: filter_sum(z, spectrum), [zf], w)
    ref, (g_ref,) = grads(lambda z: filter_sum_ref(z, spectrum), [zf], w)
    assert_close(out, ref)
    assert_close(g, g_ref)


@pytest.mark.parametrize("chunk", [None, 1, 4, 100])
def test_kernel_mix_matches_einsum(chunk):
    xf = torch.randn(9, 2, 3, dtype=C128, requires_grad=True)
    spectrum = torch.randn(9, 6, dtype=C128)
    m = torch.randn(6, 3, 4, dtype=F64, requires_grad=True)
    w = torch.randn(9, 2, 4, dtype=C128)
    out, g = grads(lambda x, m: kernel_mix(x, spectrum, m, chunk), [xf, m], w)
    ref, g_ref = grads(lambda x, m: kernel_mix_ref(x, spectrum, m), [xf, m], w)
    assert_close(out, ref)
    for a, b in zip(g, g_ref, strict=True):
        assert_close(a, b)


def test_kernel_mix_default_chunk_follows_the_byte_budget(monkeypatch):
    xf, spectrum = torch.randn(9, 2, 3, dtype=C128), torch.randn(9, 6, dtype=C128)
    m = torch.randn(6, 3, 4, dtype=F64)
    monkeypatch.setattr(fft_conv, "KERNEL_CHUNK_BYTES", 2 * 12 * 16 * 2)  # two frequencies per chunk
    seen = []
    original = fft_conv._KernelMix.apply
    monkeypatch.setattr(fft_conv._KernelMix, "apply", lambda *a: seen.append(a[-1]) or original(*a))
    assert_close(kernel_mix(xf, spectrum, m), kernel_mix_ref(xf, spectrum, m))
    assert seen == [2]


@pytest.mark.parametrize("lo, hi, n", [(0, 40, 128), (1, 31, 64), (4, 9, 16), (7, 8, 2), (3, 40, 64)])
def test_filter_spectra_minus_branch_is_the_shifted_plus_spectrum(lo, hi, n):
    phi = torch.randn(40, 5, dtype=F64)
    assert_close(filter_spectra(phi, lo, hi, n), filter_spectra_ref(phi, lo, hi, n))


def test_composed_fft_convolution_matches_direct_sum():
    """irfft(filter_sum(real_fft(z), spectra)) is the causal filter-bank convolution, values and gradients."""
    T, K, n = 23, 3, fft_size(2 * 23 - 1)
    phi = torch.randn(T, K, dtype=F64)
    z = torch.randn(2, 2 * K, 4, T, dtype=F64, requires_grad=True)  # (B, 2K filters, channels, T)
    weight = torch.randn(2, 4, T, dtype=F64)

    def fast(z):
        return torch.fft.irfft(filter_sum(real_fft(z, n), filter_spectra(phi, 0, T, n)), n=n)[..., :T]

    def direct(z):
        bank = torch.cat([phi, phi * alternating(T, 0, F64)[:, None]], dim=1).T  # (2K, T)
        return causal_conv_ref(z, bank[None, :, None]).sum(1)

    out, (g,) = grads(fast, [z], weight)
    ref, (g_ref,) = grads(direct, [z], weight)
    assert_close(out, ref)
    assert_close(g, g_ref)


def test_causal_conv_ref_is_causal_and_includes_lag_zero():
    z = torch.zeros(1, 6, dtype=F64)
    z[0, 2] = 1.0
    kernel = torch.arange(1.0, 7.0, dtype=F64)
    assert causal_conv_ref(z, kernel).tolist() == [[0, 0, 1, 2, 3, 4]]


def test_fft_size():
    assert [fft_size(n) for n in (1, 2, 3, 4, 5, 1023, 1024, 1025)] == [2, 2, 4, 4, 8, 1024, 1024, 2048]


# ---- spectrum gradients (a learnable LDS's kernel spectrum) and the LDS convolution ops ----------------


def test_filter_sum_gives_the_spectrum_its_gradient():
    zf = torch.randn(2, 5, 3, 9, dtype=C128, requires_grad=True)
    spectrum = torch.randn(9, 5, dtype=C128, requires_grad=True)
    w = torch.randn(2, 3, 9, dtype=C128)
    out, g = grads(filter_sum, [zf, spectrum], w)
    ref, g_ref = grads(filter_sum_ref, [zf, spectrum], w)
    assert_close(out, ref)
    for a, b in zip(g, g_ref, strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_kernel_mix_gives_the_spectrum_its_gradient(chunk):
    xf = torch.randn(9, 2, 3, dtype=C128, requires_grad=True)
    spectrum = torch.randn(9, 6, dtype=C128, requires_grad=True)
    m = torch.randn(6, 3, 4, dtype=F64, requires_grad=True)
    w = torch.randn(9, 2, 4, dtype=C128)
    out, g = grads(lambda x, s, m: kernel_mix(x, s, m, chunk), [xf, spectrum, m], w)
    ref, g_ref = grads(kernel_mix_ref, [xf, spectrum, m], w)
    assert_close(out, ref)
    for a, b in zip(g, g_ref, strict=True):
        assert_close(a, b)


def lds_system(h=6, F=4):
    A = torch.linspace(-0.95, 0.99, h, dtype=F64)
    A[1] = 0.0  # 0^0 = 1 at lag 0: pow's gradient must stay finite there
    return (A.requires_grad_(), torch.randn(h, dtype=F64, requires_grad=True),
            torch.randn(h, F, dtype=F64, requires_grad=True))


@pytest.mark.parametrize("length", [1, 2, 20])
def test_impulse_response_backward_matches_autograd(length):
    A, B, C = lds_system()
    w = torch.randn(length, 4, dtype=F64)
    out, g = grads(lambda *s: lds_conv.impulse_response(*s, length), [A, B, C], w)
    ref, g_ref = grads(lambda *s: lds_conv.impulse_response_ref(*s, length), [A, B, C], w)
    assert_close(out, ref)
    for a, b in zip(g, g_ref, strict=True):
        assert_close(a, b)


def test_impulse_response_and_its_spectrum():
    A, B, C = lds_system()
    G = lds_conv.impulse_response(A, B, C, 20)
    direct = torch.stack([(A.detach() ** t * B.detach()) @ C.detach() for t in range(20)])
    assert_close(G.detach(), direct)
    assert_close(lds_conv.response_spectrum(A, B, C, 20, 64).detach(), torch.fft.rfft(direct, n=64, dim=0))
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(G.square().sum(), [A, B, C]))
    stacked = lds_conv.response_spectrum(A, B, C, 20, 64, stacked=True)
    assert stacked.shape == (2 * 33, 4)


@pytest.mark.parametrize(("start", "length", "block"), [(0, 1, 64), (0, 130, 64), (7, 100, 16), (64, 5, 64)])
def test_powers_by_blocks_match_pow(start, length, block):
    A = torch.tensor([-0.999, -0.5, 0.0, 0.3, 0.9999, 1.0], dtype=F64)
    t = torch.arange(start, start + length, dtype=F64)[:, None]
    torch.testing.assert_close(lds_conv.powers(A, start, length, block), A**t, rtol=1e-14, atol=0)


def cancelling_system() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Terms of 1e6 that cancel to O(1) at the first lags, as in fitted systems, and a slow pole."""
    A = torch.tensor([0.5, 0.5001, -0.7, 0.999], dtype=F64)
    C = torch.tensor([[1e6, 2e5], [-1e6, -2e5], [1.0, 1.0], [0.5, -1.0]], dtype=F64)
    return A.requires_grad_(), torch.ones(4, dtype=F64, requires_grad=True), C.requires_grad_()


@pytest.mark.parametrize("sync_free", [False, True])
def test_split_response_keeps_float64_where_terms_cancel(sync_free, monkeypatch):
    A, B, C = cancelling_system()
    length, w = 700, torch.randn(700, 2, dtype=F64)
    if sync_free:  # what a GPU would wait for: no tensor is read on the host
        for name in ("__float__", "__bool__", "item"):
            monkeypatch.setattr(torch.Tensor, name, lambda *a: pytest.fail("host read"), raising=False)
    split = lambda *s: lds_conv.split_response(*s, length, torch.float32, sync_free=sync_free)  # noqa: E731
    out, g = grads(lambda *s: split(*s).double(), [A, B, C], w)
    monkeypatch.undo()
    ref, g_ref = grads(lambda *s: lds_conv.impulse_response(*s, length), [A, B, C], w)
    out, ref = out.detach(), ref.detach()
    plain = lds_conv.impulse_response(*(p.detach().float() for p in (A, B, C)), length).double()

    def rel(x):
        return float((x - ref).square().sum() / ref.square().sum())

    assert rel(plain) > 1e-9  # all-float32 loses the cancelling lags
    assert rel(out) < 1e-12  # about float32 rounding of G itself (1e-15)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))
    assert lds_conv.split_response(A, B, C, length, F64).dtype == F64


def test_split_response_of_a_system_without_cancellation_is_all_float32(monkeypatch):
    torch.manual_seed(0)
    A, B, C = torch.rand(8, dtype=F64) * 1.8 - 0.9, torch.randn(8, dtype=F64), torch.randn(8, 3, dtype=F64)
    ref = lds_conv.impulse_response(A, B, C, 300)
    monkeypatch.setattr(lds_conv, "impulse_response", lambda *a: pytest.fail("float64 head computed"))
    out = lds_conv.split_response(A, B, C, 300, torch.float32)
    assert out.dtype == torch.float32
    assert float((out.double() - ref).square().sum() / ref.square().sum()) < 1e-13


@pytest.mark.parametrize("path", ["kernel", "project"])
def test_exact_conv_is_the_mixed_causal_convolution(path):
    A, B, C = lds_system(F=4)
    T, n = 13, fft_size(25)
    x = torch.randn(2, T, 3, dtype=F64, requires_grad=True)
    m = torch.randn(4, 3, 5, dtype=F64, requires_grad=True)

    def fast(x, A, B, C, m):
        return lds_conv.exact_conv(x, lds_conv.response_spectrum(A, B, C, T, n), m, n, path)

    def ref(x, A, B, C, m):  # U[b, k, i, t] = (G_k * x_i)(t), then sum_k U_k @ m_k
        G = lds_conv.impulse_response(A, B, C, T)
        U = causal_conv_ref(x.transpose(1, 2)[:, None], G.T[None, :, None])
        return torch.einsum("bkit,kio->bto", U, m)

    w = torch.randn(2, T, 5, dtype=F64)
    out, g = grads(fast, [x, A, B, C, m], w)
    expected, g_ref = grads(ref, [x, A, B, C, m], w)
    assert_close(out, expected)
    for a, b in zip(g, g_ref, strict=True):
        assert_close(a, b, 1e-11)


def test_depthwise_conv_is_a_causal_convolution_per_channel():
    T, n = 11, fft_size(21)
    z = torch.randn(2, T, 3, dtype=F64, requires_grad=True)
    kernel = torch.randn(T, 3, dtype=F64, requires_grad=True)
    w = torch.randn(2, T, 3, dtype=F64)
    def fast(z, k):
        return lds_conv.depthwise_conv(z.transpose(1, 2), real_fft(k.T, n).T, n)

    out, g = grads(fast, [z, kernel], w)
    ref, g_ref = grads(lambda z, k: causal_conv_ref(z.transpose(1, 2), k.T).transpose(1, 2), [z, kernel], w)
    assert_close(out, ref)
    for a, b in zip(g, g_ref, strict=True):
        assert_close(a, b)


def test_spectrum_cache_builds_once_and_follows_its_sources():
    cache, source, built = SpectrumCache(capacity=2), torch.ones(3), []

    def build():
        built.append(1)
        return source * 2

    assert torch.equal(cache.get([source], "a", build), torch.full((3,), 2.0))
    cache.get([source], "a", build)
    assert len(built) == 1
    source.add_(1)  # edited in place: its version counter empties the cache
    assert torch.equal(cache.get([source], "a", build), torch.full((3,), 4.0)) and len(built) == 2
    cache.get([source.clone()], "a", build)  # another tensor: rebuilt
    assert len(built) == 3
    for key in "bcd":
        cache.get([source], key, build)  # back to `source`: emptied again, then 3 entries built
    assert len(built) == 6 and len(cache) == 2  # the oldest entry went
    with torch.inference_mode():
        cache.get([source], "d", build)  # kept apart from the entry a training step may save
    assert len(built) == 7


# ---- the LDS recurrence (ops.lds_scan) and the AR terms (ops.ar_scan) ----------------------------------


@pytest.mark.parametrize("T", [1, 7, 16, 45, 130])
@pytest.mark.parametrize("chunk", [1, 3, 8, 16])
@pytest.mark.parametrize("per_channel", [False, True])
def test_lds_scan_matches_scan_ref(T, chunk, per_channel):
    """Lengths below, at and past multiples of the chunk (the scan pads in front), a readout shared by
    every channel or one per channel; values, final state and gradients in float64."""
    A, B, C = lds_system(h=6, F=3)
    u = torch.randn(2, T, 4, dtype=F64, requires_grad=True)
    if per_channel:
        C = torch.randn(4, 6, 3, dtype=F64, requires_grad=True)
    weight = torch.randn(2, T, 4, 3, dtype=F64)
    inputs = [u, A, B, C]
    (out, state), ref_out_state = lds_scan.scan(*inputs, chunk, F64), lds_scan.scan_ref(*inputs)
    assert out.shape == (2, T, 4, 3) and state.shape == (2, 4, 6) and out.dtype == state.dtype == F64
    assert_close(out, ref_out_state[0])
    assert_close(state, ref_out_state[1])
    loss = lambda out_state: (out_state[0] * weight).sum() + out_state[1].sum()  # noqa: E731
    for a, b in zip(torch.autograd.grad(loss((out, state)), inputs),
                    torch.autograd.grad(loss(ref_out_state), inputs), strict=True):
        assert_close(a, b, 1e-11)
    assert_close(lds_scan.final_state(u, A, B, F64), ref_out_state[1])


def test_scan_ref_is_the_convolution_with_the_impulse_response():
    """The two references agree: scan_ref's output to a unit impulse is impulse_response_ref, which is
    float64 whatever the system's dtype; scan_ref runs in the dtype its arguments promote to."""
    A, B, C = (p.detach() for p in lds_system(h=5, F=3))
    impulse = torch.zeros(1, 30, 1, dtype=F64)
    impulse[0, 0, 0] = 1.0
    response = lds_conv.impulse_response_ref(A, B, C, 30)
    assert_close(lds_scan.scan_ref(impulse, A, B, C)[0][0, :, 0], response, 1e-14)
    assert lds_conv.impulse_response_ref(A.float(), B.float(), C.float(), 30).dtype == F64
    assert lds_scan.scan_ref(impulse.float(), A.float(), B.float(), C.float())[0].dtype == torch.float32
    assert lds_scan.scan_ref(impulse.float(), A, B, C)[0].dtype == F64


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("T, chunk", [(1, 8), (5, 8), (8, 8), (29, 8), (29, 4), (64, 16)])
def test_ar_scan_matches_ar_ref(order, T, chunk):
    g = torch.Generator().manual_seed(order)
    x, s = torch.randn(2, T, 3, dtype=F64, generator=g), torch.randn(2, T, 4, dtype=F64, generator=g)
    M_u = torch.randn(order, 3, 4, dtype=F64, generator=g) * 0.5
    M_y = torch.randn(order, 4, 4, dtype=F64, generator=g) * 0.9 / (4 * order) ** 0.5
    inputs = [p.requires_grad_() for p in (x, s, M_u, M_y)]
    weight = torch.randn(2, T, 4, dtype=F64, generator=g)
    out, ref = ar_scan.ar_scan(*inputs, chunk=chunk), ar_scan.ar_ref(*inputs)
    assert_close(out, ref, 1e-11)
    # (at T = 1 the recursion never runs: M_y gets a zero gradient from both)
    g_out, g_ref = (torch.autograd.grad((y * weight).sum(), inputs, materialize_grads=True)
                    for y in (out, ref))
    for a, b in zip(g_out, g_ref, strict=True):
        assert_close(a, b, 1e-10)
