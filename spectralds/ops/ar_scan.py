"""The AR terms of a layer (`spectralds.layers.ar`) as a parallel scan, next to their step-by-step reference.

With s_t the layer's spectral output, x_t its input, M_u (p, dim, dim_out) and M_y (p, dim_out, dim_out):

    y_t = s_t + sum_{j=0..p-1} x_{t-j} @ M_u[j] + sum_{i=1..p} y_{t-i} @ M_y[i-1]

fast op                                          reference (a loop over time)
  ar_scan(x, s, M_u, M_y, chunk)                   ar_ref(x, s, M_u, M_y)

The recursion is a linear IIR filter with matrix coefficients. With the companion state
z_t = [y_t, y_{t-1}, ..., y_{t-p+1}] (p * dim_out wide), z_t = z_{t-1} @ P + [v_t, 0..0], v_t the
non-recursive part, so z_t = sum_{s<=t} [v_s, 0..0] @ P^(t-s). `ar_scan` computes it as a chunked scan
(like `ops.lds_scan.scan`): inside chunks of `chunk` steps, one block-Toeplitz matmul with the
recursion's matrix impulse response P^k[:d, :d]; the states at chunk ends are carried by a log-depth
doubling scan with P^chunk; each chunk adds the response to the state it inherits. No loop over time,
exact up to float rounding, differentiable by autograd; cost O(B T d^2 (chunk + 2p)) plus
O(B (T / chunk) (p d)^2 log T). Checked against `ar_ref` (values and gradients) in tests/layers/test_ar.py.
"""

from __future__ import annotations

import torch
from torch import nn


def _shifted(x: torch.Tensor, lag: int) -> torch.Tensor:
    """x delayed by `lag` steps along time (dim 1), zeros before the start."""
    if lag == 0:
        return x
    if lag >= x.shape[1]:
        return torch.zeros_like(x)
    return nn.functional.pad(x[:, :-lag], (0, 0, lag, 0))


def ar_drive(x: torch.Tensor, s: torch.Tensor, M_u: torch.Tensor) -> torch.Tensor:
    """v = s + sum_j x_{t-j} @ M_u[j]: everything but the recursion, (B, T, dim_out)."""
    v = s
    for j in range(M_u.shape[0]):
        v = v + _shifted(x, j) @ M_u[j].to(x.dtype)
    return v


def companion(M_y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """P (p d, p d): z_t = z_{t-1} @ P + [v_t, 0, ..., 0] with z_t = [y_t, ..., y_{t-p+1}]."""
    p, d = M_y.shape[0], M_y.shape[-1]
    shift = torch.eye(p * d, dtype=dtype, device=M_y.device)[:, : (p - 1) * d]  # block i -> i+1
    return torch.cat([M_y.to(dtype).reshape(p * d, d), shift], dim=1)


def ar_scan(
    x: torch.Tensor, s: torch.Tensor, M_u: torch.Tensor, M_y: torch.Tensor, chunk: int = 8
) -> torch.Tensor:
    """Outputs y (B, T, dim_out) for inputs x (B, T, dim) and spectral outputs s (B, T, dim_out), in
    s's dtype after the drive (the weights are cast to it)."""
    v = ar_drive(x, s, M_u)
    batch, steps, d = v.shape
    c = min(chunk, steps)
    P = companion(M_y, v.dtype)
    powers = [torch.eye(P.shape[0], dtype=v.dtype, device=v.device)]
    for _ in range(c):
        powers.append(powers[-1] @ P)
    pw = torch.stack(powers)  # (c + 1, p d, p d): P^0 .. P^c
    # Inside a chunk y_tau = sum_{sigma <= tau} v_sigma G_{tau - sigma}, G_k = P^k[:d, :d]: one block-
    # Toeplitz matmul. A chunk's final state is sum_sigma v_sigma P^(c-1-sigma)[:d]; the states are
    # carried across chunks by the doubling scan with P^c; a chunk adds z_in P^(tau+1)[:, :d].
    lag = torch.arange(c, device=v.device)[None, :] - torch.arange(c, device=v.device)[:, None]
    toeplitz = pw[lag.clamp(min=0), :d, :d] * (lag >= 0)[..., None, None].to(v.dtype)  # (s, tau, d, d)
    toeplitz = toeplitz.permute(0, 2, 1, 3).reshape(c * d, c * d)
    to_end = pw[:c, :d].flip(0).reshape(c * d, -1)  # (c d, p d): rows of P^(c-1-sigma)
    from_state = pw[1:, :, :d].permute(1, 0, 2).reshape(-1, c * d)  # (p d, c d): P^(tau+1)[:, :d]
    # Zeros in front keep the zero initial state, so the last chunk ends at the last step.
    v = nn.functional.pad(v, (0, 0, (-steps) % c, 0))
    n = v.shape[1] // c
    chunks = v.reshape(batch, n, c * d)
    ends, shift, power = chunks @ to_end, 1, pw[c]
    while shift < n:  # after the round with `shift`, ends[m] sums the last 2 * shift chunks
        ends = torch.cat([ends[:, :shift], ends[:, shift:] + ends[:, :-shift] @ power], dim=1)
        power, shift = power @ power, 2 * shift
    inherited = nn.functional.pad(ends[:, :-1], (0, 0, 1, 0))
    y = chunks @ toeplitz + inherited @ from_state
    return y.reshape(batch, n * c, d)[:, n * c - steps :]


def ar_ref(x: torch.Tensor, s: torch.Tensor, M_u: torch.Tensor, M_y: torch.Tensor) -> torch.Tensor:
    """The formula one step at a time, in the dtype of its arguments (autograd differentiates it)."""
    ys = []
    for t in range(x.shape[1]):
        y = s[:, t]
        for j in range(M_u.shape[0]):
            if t - j >= 0:
                y = y + x[:, t - j] @ M_u[j]
        for i in range(1, M_y.shape[0] + 1):
            if t - i >= 0:
                y = y + ys[t - i] @ M_y[i - 1]
        ys.append(y)
    return torch.stack(ys, dim=1) if ys else s.clone()
