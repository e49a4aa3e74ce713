"""Measurements of an LDS against the filters it should realize: the 2K targets, relative MSEs, and the
float32 behaviour of the plain recurrence. Shared by the fit (`spectralds.distill.fit`), the fit file's
checks (`spectralds.distill.lds_file`) and the swap (`spectralds.distill.convert`)."""

from __future__ import annotations

import torch

from spectralds.errors import UserError
from spectralds.ops.lds_scan import scan_ref

F64 = torch.float64
CHECK_SEED = 0  # the input of the float32 check


def target_filters(filters: torch.Tensor) -> torch.Tensor:
    """(L, 2K): the K filters, then the same filters times (-1)^t."""
    sign = 1.0 - 2.0 * (torch.arange(filters.shape[0]) % 2).to(filters.dtype)
    return torch.cat([filters, filters * sign[:, None]], dim=1)


def relative_mse(pred: torch.Tensor, target: torch.Tensor, per_filter: bool = False) -> float | torch.Tensor:
    """sum (pred - target)^2 / sum target^2 over (time, filter), or per filter (column) as a tensor."""
    if pred.shape != target.shape:
        raise UserError(f"pred has shape {tuple(pred.shape)} but target has {tuple(target.shape)}")
    err = (pred.to(F64) - target.to(F64)).square()
    ref = target.to(F64).square()
    if not per_filter:
        return float(err.sum() / ref.sum())
    ref = ref.sum(dim=0)
    return err.sum(dim=0) / torch.where(ref > 0, ref, 1.0)


def output_rel_mse(out: torch.Tensor, ref: torch.Tensor) -> float:
    """sum (out - ref)^2 / sum ref^2 over every element, in float64, of a layer's outputs against a
    reference output (a zero reference, say a zero-initialised projection, gives no division by zero)."""
    out, ref = out.to(F64), ref.to(F64)
    return ((out - ref).square().sum() / ref.square().sum().clamp_min(1e-300)).item()


def float32_recurrence(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The plain float32 loop x_t = A x_{t-1} + B u_t, y_t = C^T x_t (`ops.lds_scan.scan_ref` run in
    float32) for a 1-d input u (T,): y (T, 2K)."""
    A32, B32, C32, u32 = (t.to(torch.float32) for t in (A, B, C, u))
    return scan_ref(u32[None, :, None], A32, B32, C32)[0][0, :, 0]


def float32_check(
    A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, targets: torch.Tensor, seed: int = CHECK_SEED
) -> tuple[float, list[float]]:
    """Relative MSE (overall, per filter) of `float32_recurrence` on a Gaussian input (fixed seed) of
    length L against the exact float64 convolution of that input with the (L, 2K) target filters."""
    length = targets.shape[0]
    u = torch.randn(length, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    n = 1 << (2 * length - 1).bit_length()
    exact = torch.fft.irfft(torch.fft.rfft(u.to(F64), n)[:, None] * torch.fft.rfft(targets.to(F64), n, dim=0),
                            n, dim=0)[:length]
    y = float32_recurrence(A, B, C, u)
    return relative_mse(y, exact), relative_mse(y, exact, per_filter=True).tolist()


def cancellation_factor(B: torch.Tensor, C: torch.Tensor, targets: torch.Tensor) -> float:
    """max_k sum_j |B_j C_jk| / max_t |target_k(t)|: how far the terms of a filter exceed the filter."""
    terms = (B[:, None] * C).abs().sum(dim=0)
    return float((terms / targets.abs().max(dim=0).values).max())
