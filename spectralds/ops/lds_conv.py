"""The diagonal LDS as a convolution: its 2K outputs are causal convolutions of each input channel with
the system's impulse response G[t, f] = sum_j C[j, f] B[j] A[j]^t (lag 0 included).

  impulse_response(A, B, C, length)       G (length, F) in A's dtype, differentiable (reference:
                                          impulse_response_ref, always float64)
  split_response(A, B, C, length, dtype)  G in `dtype` past the lags whose terms cancel (float64 there)
  response_spectrum(A, B, C, length, n)   rfft of G's columns zero-padded to n, (n // 2 + 1, F)
  exact_conv(x, spectrum, m, n, path)     sum_k (G_k * x) m[k]: the STU's two exact arrangements
  depthwise_conv(z, spectrum, n)          one kernel per channel (tensordot mode), z time-last

A fitted system is fixed, so its spectrum is computed once per FFT length (the layer caches it); a
learnable one is rebuilt every step, O(length h F) for G plus F FFTs, and gets its gradient through
`real_fft`, `filter_sum` and `kernel_mix`. Checked against the chunked scan in tests/layers/test_lds.py.
"""

from __future__ import annotations

import torch

from spectralds.ops.fft_conv import filter_sum, kernel_mix, real_fft

# `split_response`: float32 from the lag where the terms' bound is at most this many times the response.
CANCELLATION = 4.0
SYNC_FREE_HEAD = 1024  # lags always computed in float64 without host reads (fitted terms: x0.4 at 1000)


class _ImpulseResponse(torch.autograd.Function):
    """G = (P * B) @ C with P[t, j] = A[j]^t, and a backward from the saved powers (autograd would run
    pow again for dP/dA, the costliest step): with R = dG C^T,
    dC = (P B)^T dG,  dB = sum_t P R,  dA = B sum_{t >= 1} t P[t - 1] R[t]  (exact at A = 0 too)."""

    @staticmethod
    def forward(ctx, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, length: int) -> torch.Tensor:
        table = powers(A, 0, length)  # (T, h)
        ctx.save_for_backward(table, B, C)
        return (table * B) @ C

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        table, B, C = ctx.saved_tensors
        need_A, need_B, need_C = ctx.needs_input_grad[:3]
        grad_A = grad_B = grad_C = None
        if need_C:
            grad_C = (table * B).T @ grad
        if need_A or need_B:
            R = grad @ C.T  # (T, h)
            grad_B = (table * R).sum(0) if need_B else None
            if need_A:
                lags = torch.arange(1, table.shape[0], dtype=R.dtype, device=R.device)[:, None]
                grad_A = B * (table[:-1] * R[1:]).mul_(lags).sum(0)
        return grad_A, grad_B, grad_C, None


def impulse_response(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, length: int) -> torch.Tensor:
    """G (length, F) = sum_j C[j, f] B[j] A[j]^t in A's dtype."""
    return _ImpulseResponse.apply(A, B, C, length)


def powers(A: torch.Tensor, start: int, length: int, block: int = 64) -> torch.Tensor:
    """A^t (length, h) for t = start..start+length-1, as (A^(start + block m))_m times (A^s)_{s < block}:
    pow runs on two small tables (pow is the costliest elementwise op, and its backward runs pow again)."""
    block = max(1, min(block, length))
    blocks = -(-length // block)
    within = A ** torch.arange(block, dtype=A.dtype, device=A.device)[:, None]  # (block, h)
    starts = A ** (start + block * torch.arange(blocks, dtype=A.dtype, device=A.device))[:, None]
    return (starts[:, None] * within).flatten(0, 1)[:length]


def split_response(
    A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, length: int, dtype: torch.dtype, head: int = 64,
    sync_free: bool | None = None,
) -> torch.Tensor:
    """G (length, F) of a float64 system in `dtype` (float32), with the first lags, where its terms
    cancel, computed in float64: differentiable, about float64's accuracy at the cost of `dtype`.

    A fitted system's terms B_j C_jf A_j^t cancel by factors up to 1e6 at the first lags (their sum, G,
    is small) but soon decay (measured, L = 8192, 48 states: x950 at lag 10, x10 at lag 100, x0.4 at
    lag 1000). Float32 is kept from the first lag t in 0, head, 2 head, 4 head, ... where the terms'
    bound max_f sum_j |B_j C_jf| |A_j|^t is at most `CANCELLATION` x max |G|: float32's error there is
    a few roundings of G's peak. A system whose terms do not cancel (a random one) runs all in float32.
    Each test of the bound reads a number on the host; `sync_free` (default: on CUDA, where that read
    waits for the GPU) instead computes the first `SYNC_FREE_HEAD` lags in float64 always and takes
    them wherever the bound asks, with no host read (past those lags float32 is taken unchecked).
    """
    if dtype == A.dtype:
        return impulse_response(A, B, C, length)
    BC = B[:, None] * C  # (h, F)
    # built time-last, (F, length) contiguous, as the FFT that follows wants it
    G = BC.to(dtype).T @ powers(A.to(dtype), 0, length).T
    # the bound of the terms at lag t: max_f (|A|^t @ terms)_f, never differentiated
    limit, magnitude, terms = CANCELLATION * G.detach().abs().max(), A.detach().abs(), BC.detach().abs()
    if A.is_cuda if sync_free is None else sync_free:
        lags = min(length, SYNC_FREE_HEAD)
        cancels = (powers(magnitude, 0, lags) @ terms).amax(dim=1) > limit  # (lags,)
        exact = impulse_response(A, B, C, lags).to(dtype).T
        return torch.cat([torch.where(cancels, exact, G[:, :lags]), G[:, lags:]], dim=1).T
    lag = 0
    while lag < length and float((magnitude**lag @ terms).max()) > limit:
        lag = min(max(head, 2 * lag), length)
    if lag:
        G = torch.cat([impulse_response(A, B, C, lag).to(dtype).T, G[:, lag:]], dim=1)
    return G.T


def impulse_response_ref(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, length: int) -> torch.Tensor:
    """G (length, F) = sum_j C[j, f] B[j] A[j]^t by direct powers, always in float64 (A, B, C: tensors or
    arrays of any float dtype, cast first; differentiable): the reference of `impulse_response` and what
    every measurement of a system (`spectralds.distill`, `LDS.impulse_response`) computes."""
    A, B, C = (torch.as_tensor(v).to(torch.float64) for v in (A, B, C))
    t = torch.arange(length, dtype=torch.float64, device=A.device)
    return A[None, :] ** t[:, None] @ (B[:, None] * C)


def response_spectrum(
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    length: int,
    n: int,
    stacked: bool = False,
    fft_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """rfft of G zero-padded to n: (n // 2 + 1, F) complex, or stacked [real; imag] (2 (n // 2 + 1), F).

    fft_dtype: the FFT's dtype; G is formed by `split_response`, in float64 where the terms of a fitted
    system cancel, in fft_dtype past that.
    """
    G = split_response(A, B, C, length, fft_dtype or A.dtype)
    spectrum = real_fft(G.T, n).T
    return torch.cat([spectrum.real, spectrum.imag]) if stacked else spectrum


def exact_conv(x: torch.Tensor, spectrum: torch.Tensor, m: torch.Tensor, n: int, path: str) -> torch.Tensor:
    """y (B, T, dim_out) = sum_k (G_k * x) @ m[k] for x (B, T, dim), spectrum (n // 2 + 1, 2K) of G and
    m (2K, dim, dim_out), by the STU's "kernel" (W(f) = sum_k S_k(f) m_k) or "project" arrangement."""
    T = x.shape[1]
    if path == "kernel":
        xf = real_fft(x.transpose(1, 2), n).permute(2, 0, 1).contiguous()  # (F, B, dim)
        y = torch.fft.irfft(kernel_mix(xf, spectrum, m).permute(1, 2, 0), n=n)
    else:
        z = x @ m.permute(1, 0, 2).flatten(1)  # (B, T, 2K * dim_out)
        z = z.transpose(1, 2).unflatten(1, (m.shape[0], m.shape[2]))  # (B, 2K, dim_out, T)
        y = torch.fft.irfft(filter_sum(real_fft(z, n), spectrum), n=n)
    return y[..., :T].transpose(1, 2)


def depthwise_conv(z: torch.Tensor, spectrum: torch.Tensor, n: int) -> torch.Tensor:
    """y (B, T, ch): channel c of z (B, ch, T), time last and contiguous (a strided FFT copies), convolved
    with its own kernel, spectrum (n // 2 + 1, ch)."""
    y = torch.fft.irfft(real_fft(z, n) * spectrum.T, n=n)
    return y[..., : z.shape[-1]].transpose(1, 2)
