"""How attention sees positions: rotary embeddings (RoPE), ALiBi biases, or nothing.

RoPE rotates queries and keys by their positions; ALiBi (Press et al. 2021) adds -slope_h * (t - s) to the
score of query t and key s in head h, after any soft cap (as flash-attn adds it). Both depend only on
the lag t - s, so decoding caches, left padding and ring buffers need no more than each key's lag.
"""

from __future__ import annotations

import math

import torch

POSITIONS = ("rope", "none", "alibi")


def at_least_float32(t: torch.Tensor, like: torch.dtype | None = None) -> torch.Tensor:
    """Half-precision math (RoPE, softmax logits) runs in float32; float64 stays float64."""
    return t.to(torch.promote_types(like or t.dtype, torch.float32))


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate channel pairs (i, i + head_dim/2) of x (..., T, head_dim) by positions * theta^(-2i/hd).

    positions: (T,), or any shape broadcasting against x's leading dims, e.g. (batch, 1, 1) per sequence.
    """
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float64, device=x.device) / half)
    angles = positions.to(torch.float64)[..., None] * freqs  # float64: exact angles at large positions
    cos, sin = at_least_float32(angles.cos(), x.dtype), at_least_float32(angles.sin(), x.dtype)
    x1, x2 = at_least_float32(x[..., :half]), at_least_float32(x[..., half:])
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def alibi_slopes(num_heads: int, scale: float = 1.0) -> list[float]:
    """ALiBi's per-head slopes times `scale`: for n heads, a power of two, 2^(-8 (h + 1) / n); otherwise
    those of the largest power of two m below n, then every other slope of 2m heads (the first n - m).
    flash-stu-2 scales them by 0.25 (positional interpolation, arXiv 2310.13017)."""
    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    m = 1 << int(math.floor(math.log2(num_heads)))
    slopes = geometric(m) + geometric(2 * m)[0::2][: num_heads - m]
    return [s * scale for s in slopes]


def lags(T: int, device: torch.device | None = None) -> torch.Tensor:
    """(T, T) long, t - s for query t and key s."""
    return torch.arange(T, device=device)[:, None] - torch.arange(T, device=device)[None, :]


def alibi_bias(slopes: torch.Tensor, lag: torch.Tensor) -> torch.Tensor:
    """-slope_h * lag: slopes (heads,), lag (..., Tq, Tk) -> (..., heads, Tq, Tk) in the slopes' dtype."""
    return -slopes[:, None, None] * lag.unsqueeze(-3).to(slopes.dtype)
