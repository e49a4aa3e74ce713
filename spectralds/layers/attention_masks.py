"""Causal sliding-window masks for attention, with ALiBi biases folded in: SDPA masks, the banded SDPA
kernel, and FlexAttention's block mask and score_mod."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spectralds.layers.positions import alibi_bias, lags

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch without FlexAttention
    create_block_mask = flex_attention = None


def window_mask(T: int, window: int | None, device: torch.device | None = None) -> torch.Tensor:
    """(T, T) boolean, True where query t may attend to key s: t - window < s <= t."""
    lag = lags(T, device)
    return (lag >= 0) & (lag < window) if window is not None else lag >= 0


def score_mask(
    lag: torch.Tensor, allowed: torch.Tensor, slopes: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """SDPA's attn_mask: `allowed` itself without ALiBi, else the additive (heads, Tq, Tk) ALiBi bias with
    -inf where not allowed."""
    if slopes is None:
        return allowed
    return alibi_bias(slopes, lag).masked_fill(~allowed, float("-inf")).to(dtype)


def banded_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    dropout: float = 0.0,
    slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sliding-window SDPA in query blocks of `window`: block b >= 1 attends to the 2 windows of keys
    ending with it under one (W, 2W) band mask, block 0 is plain causal; the work is about 2 T window
    rather than T^2, and no (T, T) mask is built. slopes (heads,): ALiBi, the same band bias per block."""
    B, T, W = q.shape[0], q.shape[2], window
    if slopes is None:
        first = F.scaled_dot_product_attention(q[:, :, :W], k[:, :, :W], v[:, :, :W], dropout_p=dropout,
                                               is_causal=True)
    else:
        causal = score_mask(lags(W, q.device), window_mask(W, None, q.device), slopes, q.dtype)
        first = F.scaled_dot_product_attention(q[:, :, :W], k[:, :, :W], v[:, :, :W], attn_mask=causal,
                                               dropout_p=dropout)
    blocks = -(-T // W) - 1
    pad = (blocks + 1) * W - T  # the last block padded at the end; its extra rows are dropped
    # Blocks join the batch axis, heads stay on axis 1: a per-head bias broadcasts over (B nb).
    rest = F.pad(q[:, :, W:], (0, 0, 0, pad)).unflatten(2, (blocks, W)).transpose(1, 2).flatten(0, 1)
    # keys of block b: positions (b - 1) W .. (b + 1) W - 1
    k, v = (F.pad(t, (0, 0, 0, pad)).unfold(2, 2 * W, W).transpose(-1, -2).transpose(1, 2).flatten(0, 1)
            for t in (k, v))
    # query i of a block is position W + i of its 2W keys
    band = score_mask(lags(2 * W, q.device)[W:], window_mask(2 * W, W, q.device)[W:], slopes, q.dtype)
    y = F.scaled_dot_product_attention(rest, k, v, attn_mask=band, dropout_p=dropout)  # (B nb, heads, W, hd)
    y = y.unflatten(0, (B, blocks)).transpose(1, 2).flatten(2, 3)
    return torch.cat([first, y], dim=2)[:, :, :T]


def flex_masks(
    T: int, window: int | None, cap: float | None, slopes: torch.Tensor | None, device: torch.device
) -> tuple[object, object]:
    """FlexAttention's causal (windowed) block mask and score_mod: the soft cap, then ALiBi (None: none)."""
    def keep(b, h, q_idx, kv_idx):
        causal = q_idx >= kv_idx
        return causal if window is None else causal & (q_idx - kv_idx < window)

    def modified(s, b, h, q_idx, kv_idx):
        s = s if cap is None else cap * torch.tanh(s / cap)
        return s if slopes is None else s - slopes[h] * (q_idx - kv_idx)

    mask = create_block_mask(keep, None, None, T, T, device=device)
    return mask, None if cap is None and slopes is None else modified
