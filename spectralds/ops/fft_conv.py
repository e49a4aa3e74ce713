"""FFT pieces of the STU convolution: each fast op next to a plain-PyTorch reference.

fast op (custom autograd)                      reference (plain PyTorch; autograd differentiates it)
  real_fft(z, n)                                 real_fft_ref(z, n): torch.fft.rfft
  filter_sum(zf, spectrum)                       filter_sum_ref: one einsum
  kernel_mix(xf, spectrum, m)                    kernel_mix_ref: every W(f) built at once, then an einsum
  filter_spectra(phi, lo, hi, n)                 filter_spectra_ref: rfft of [phi, (-1)^s phi]
and the whole convolution they compose to: causal_conv_ref, a direct O(T^2) sum over lags.

The references stay in the library (not only in tests) so any new fast path can be checked against them;
tests/ops/test_ops.py compares every op's forward and backward with its reference in float64.
"""

from __future__ import annotations

import torch

# kernel_mix builds the per-frequency kernels W(f) this many bytes at a time (bounds peak memory).
KERNEL_CHUNK_BYTES = 1 << 27


def fft_size(n: int) -> int:
    """The smallest power of two >= max(n, 2) (even, as the alternating-filter spectrum trick needs)."""
    return max(2, 1 << (n - 1).bit_length())


def alternating(length: int, start: int = 0, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """(-1)^s for s = start..start+length-1."""
    s = torch.arange(start, start + length, device=device)
    return (1 - 2 * (s % 2)).to(dtype)


# ---- rfft with a cheap backward ---------------------------------------------------------------------


class _RealFFT(torch.autograd.Function):
    """torch.fft.rfft(z, n) along the last dim, with a backward by one inverse real FFT.

    PyTorch differentiates rfft through a zero-padded complex FFT and several full-size copies, which
    made it the slowest step of the STU backward. For real z: dL/dz_t = Re(sum_f g_f e^{2 pi i f t / n})
    over the rfft bins f = 0..n/2, i.e. (n / 2) irfft(g) plus half the real parts of the two unpaired
    bins (0 and n/2), which irfft counts once instead of twice.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, n: int) -> torch.Tensor:
        ctx.length, ctx.n = z.shape[-1], n
        return torch.fft.rfft(z, n=n)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        length, n = ctx.length, ctx.n
        grad = torch.fft.irfft(g, n=n, norm="forward")[..., :length]  # n * irfft(g)
        edges = g[..., :1].real + g[..., -1:].real * alternating(length, 0, grad.dtype, grad.device)
        return torch.add(grad, edges).mul_(0.5), None


def real_fft(z: torch.Tensor, n: int) -> torch.Tensor:
    """rfft of real z (..., T) zero-padded to n along the last dim: (..., n // 2 + 1)."""
    return _RealFFT.apply(z, n)


def real_fft_ref(z: torch.Tensor, n: int) -> torch.Tensor:
    return torch.fft.rfft(z, n=n)


# ---- sum over filters in frequency space --------------------------------------------------------------


class _FilterSum(torch.autograd.Function):
    """y[b, o, f] = sum_k zf[b, k, o, f] * spectrum[f, k] (constant for the STU, learnable for an LDS).

    Forward is a loop of fused multiply-adds (an einsum copies zf, the largest tensor, into a batched
    matmul layout, several times slower); backward is one broadcast product (autograd through the loop
    would build a zf-sized gradient per filter).
    """

    @staticmethod
    def forward(ctx, zf: torch.Tensor, spectrum: torch.Tensor) -> torch.Tensor:
        # zf is kept only when the spectrum needs a gradient (a learnable LDS kernel): it is the big one.
        ctx.save_for_backward(spectrum, zf if ctx.needs_input_grad[1] else None)
        spectrum = spectrum.T
        y = zf[:, 0] * spectrum[0]
        for k in range(1, zf.shape[1]):
            y.addcmul_(zf[:, k], spectrum[k])
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        spectrum, zf = ctx.saved_tensors
        grad_z = grad[:, None] * spectrum.T.conj()[:, None] if ctx.needs_input_grad[0] else None
        grad_s = None
        if zf is not None:  # dS[f, k] = sum_bo conj(zf[b, k, o, f]) g[b, o, f]; einsum's complex bmm is slow
            grad_s = torch.stack([(zf[:, k].conj() * grad).sum((0, 1)) for k in range(zf.shape[1])], 1)
        return grad_z, grad_s


def filter_sum(zf: torch.Tensor, spectrum: torch.Tensor) -> torch.Tensor:
    """zf (B, K, O, F) times a spectrum (F, K), summed over K: (B, O, F)."""
    return _FilterSum.apply(zf, spectrum)


def filter_sum_ref(zf: torch.Tensor, spectrum: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bkof,fk->bof", zf, spectrum)


# ---- per-frequency kernel W(f) = sum_k S_k(f) M_k -------------------------------------------------------


def _frequency_kernel(spectrum: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """W(f) = sum_k spectrum[f, k] m[k] for a chunk of frequencies: (F, dim, dim_out), complex."""
    m_flat = m.flatten(1)
    return torch.complex(spectrum.real @ m_flat, spectrum.imag @ m_flat).view(-1, *m.shape[1:])


def _mixed(xf: torch.Tensor, spectrum: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """xf (F, B, dim) @ W(f) for a chunk of frequencies, in real arithmetic: W's real and imaginary parts
    are one real matmul apart (no complex W is assembled, a copy as costly as the matmul), and the real
    and imaginary rows of X go through each part in one batched matmul."""
    count, batch = xf.shape[:2]
    w = (torch.cat([spectrum.real, spectrum.imag]) @ m.flatten(1)).view(2, count, *m.shape[1:])
    rows = torch.cat([xf.real, xf.imag], 1)  # (F, 2B, dim)
    by_real, by_imag = torch.bmm(rows, w[0]), torch.bmm(rows, w[1])
    return torch.complex(by_real[:, :batch] - by_imag[:, batch:], by_imag[:, :batch] + by_real[:, batch:])


class _KernelMix(torch.autograd.Function):
    """Y(f) = X(f) @ W(f) with W(f) = sum_k S[f, k] M[k], a few frequencies at a time.

    Only X, S and M are saved: backward rebuilds each chunk of W instead of keeping all F of them
    (F * dim * dim_out complex numbers). S gets a gradient only when it asks for one (a learnable LDS):
    W is complex-linear in S with M real, so dS[f, k] = sum_io M[k, io] dW[f, io], dW = X^H dY.
    """

    @staticmethod
    def forward(ctx, xf: torch.Tensor, spectrum: torch.Tensor, m: torch.Tensor, chunk: int) -> torch.Tensor:
        ctx.save_for_backward(xf, spectrum, m)
        ctx.chunk = chunk
        pieces = [_mixed(xf[f : f + chunk], spectrum[f : f + chunk], m) for f in range(0, xf.shape[0], chunk)]
        return torch.cat(pieces)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        xf, spectrum, m = ctx.saved_tensors
        grad = grad.contiguous()  # it arrives permuted from the inverse FFT; strided complex bmm is slow
        grad_x = torch.empty_like(xf) if ctx.needs_input_grad[0] else None
        grad_m = torch.zeros_like(m) if ctx.needs_input_grad[2] else None
        grad_s = torch.empty_like(spectrum) if ctx.needs_input_grad[1] else None
        m_rows = m.flatten(1).T  # (dim * dim_out, K)
        for f in range(0, xf.shape[0], ctx.chunk):
            part = slice(f, f + ctx.chunk)
            if grad_x is not None:  # complex matmul rule: dX = dY W^H
                w = _frequency_kernel(spectrum[part], m)
                grad_x[part] = torch.bmm(grad[part].conj(), w.transpose(1, 2)).conj()
            if grad_m is not None or grad_s is not None:  # dW = X^H dY; W = S_re M + i S_im M, M real
                grad_w = torch.bmm(xf[part].mH, grad[part]).flatten(1)
            if grad_m is not None:
                s = spectrum[part]
                grad_m += (s.real.T @ grad_w.real + s.imag.T @ grad_w.imag).view_as(m)
            if grad_s is not None:
                grad_s[part] = torch.complex(grad_w.real @ m_rows, grad_w.imag @ m_rows)
        return grad_x, grad_s, grad_m, None


def kernel_mix(
    xf: torch.Tensor, spectrum: torch.Tensor, m: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """xf (F, B, dim) @ W(f), W(f) = sum_k spectrum[f, k] m[k] (m real (K, dim, dim_out)): (F, B, dim_out).

    chunk: frequencies per piece; by default as many as fit in KERNEL_CHUNK_BYTES (W is complex: the 2).
    """
    if chunk is None:
        chunk = max(1, KERNEL_CHUNK_BYTES // (2 * m[0].numel() * xf.element_size()))
    return _KernelMix.apply(xf, spectrum, m, chunk)


def kernel_mix_ref(xf: torch.Tensor, spectrum: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    w = torch.einsum("fk,kio->fio", spectrum, m.to(spectrum.dtype))
    return torch.einsum("fbi,fio->fbo", xf, w)


# ---- spectra of the fixed filter bank ---------------------------------------------------------------------


def filter_spectra(phi: torch.Tensor, lo: int, hi: int, n: int) -> torch.Tensor:
    """rfft (zero-padded to n) of [phi, (-1)^s phi] at lags lo..hi-1: (n // 2 + 1, 2K), one FFT of K columns.

    (-1)^s = e^{i pi s}, so the "-" spectrum is the "+" one shifted by n/2: for an rfft (n even), the
    reversed conjugate, times (-1)^lo for a bank starting at lag lo.
    """
    plus = torch.fft.rfft(phi[lo:hi], n=n, dim=0)
    minus = plus.flip(0).conj() * (-1) ** lo
    return torch.cat([plus, minus], dim=1)


def filter_spectra_ref(phi: torch.Tensor, lo: int, hi: int, n: int) -> torch.Tensor:
    sign = alternating(hi, 0, phi.dtype, phi.device)[:, None]
    return torch.fft.rfft(torch.cat([phi[:hi], phi[:hi] * sign], dim=1)[lo:], n=n, dim=0)


def causal_conv_ref(z: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Direct causal convolution along the last dim, lag 0 included (leading dims broadcast):
    y[..., t] = sum_{s <= t} kernel[..., s] z[..., t - s]. O(T^2), for checking the FFT paths."""
    T = z.shape[-1]
    shape = (*torch.broadcast_shapes(z.shape[:-1], kernel.shape[:-1]), T)
    y = z.new_zeros(shape, dtype=torch.promote_types(z.dtype, kernel.dtype))
    for s in range(min(T, kernel.shape[-1])):
        y[..., s:] += kernel[..., s, None] * z[..., : T - s]
    return y


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """FFT convolutions run in float32, or float64 for float64 inputs (half precision loses the filters)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def no_autocast(device: torch.device):
    """The FFT convolutions run outside autocast, whatever the ambient precision."""
    return torch.autocast(device.type, enabled=False)
