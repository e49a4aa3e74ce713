"""The KV caches of `spectralds.layers.attention`: the growing one (`KVCache`), its fixed-shape form for
CUDA graphs (`RingKVCache`), and `merge_caches`, one cache for prompts prefilled apart."""

from __future__ import annotations

from typing import NamedTuple

import torch

from spectralds.errors import UserError


class KVCache(NamedTuple):
    """k, v: (batch, heads, capacity, head_dim), already rotated; the first `entries` slots are valid
    and, with a window, position p lives in slot p % window_size. pos: position of the next token.

    start: None, or per sequence (batch,) the position of its first token when prompts of different
    lengths were right-aligned (a left-padded prefill, `merge_caches`): sequence b is at position
    pos - start[b], and slots holding positions before start[b] are padding, never attended to.
    """

    k: torch.Tensor
    v: torch.Tensor
    pos: int
    start: torch.Tensor | None = None

    def entries(self, window_size: int | None) -> int:
        return self.pos if window_size is None else min(self.pos, window_size)


class RingKVCache(NamedTuple):
    """A window's cache in fixed shapes: k, v (batch, heads, window, head_dim), position p of sequence b
    in slot p % window; pos (batch,) int64, each sequence's next position, on the cache's device."""

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor


def merge_caches(caches: list[KVCache], window_size: int | None) -> KVCache:
    """One cache for prompts of different lengths, each cache from its own prefill (left-padded or not).

    The prompts are right-aligned at the longest, P: a prompt of length T becomes P - T padding slots
    (masked, `KVCache.start`) then its own entries, so one slot index serves the whole batch. Each
    sequence keeps its own RoPE positions, so its outputs are those of its prefill decoded alone.
    """
    if any(isinstance(c, RingKVCache) for c in caches):
        raise UserError("merge_caches takes caches from a prefill, not fixed-shape (CUDA-graph) ones")
    longest = max(c.pos for c in caches)
    capacity = longest if window_size is None else min(longest, window_size)
    ks, vs, starts = [], [], []
    for cache in caches:
        shift, kept = longest - cache.pos, cache.entries(window_size)
        positions = torch.arange(cache.pos - kept, cache.pos, device=cache.k.device)
        old = positions if window_size is None else positions % window_size
        new = positions + shift if window_size is None else (positions + shift) % window_size
        for source, out in ((cache.k, ks), (cache.v, vs)):
            merged = source.new_zeros(*source.shape[:2], capacity, source.shape[3])
            merged[:, :, new] = source[:, :, old]
            out.append(merged)
        own = 0 if cache.start is None else cache.start.to(cache.k.device)  # a left-padded prefill's
        starts.append(torch.full((cache.k.shape[0],), shift, dtype=torch.long, device=cache.k.device) + own)
    start = torch.cat(starts)  # all zero (prompts of one length): the plain step, nothing to mask
    return KVCache(torch.cat(ks), torch.cat(vs), longest, start if start.any() else None)


def extended(
    cache: KVCache, k: torch.Tensor, v: torch.Tensor, window_size: int | None, keep: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, KVCache | None]:
    """A chunk's keys and values k, v (batch, heads, T, head_dim) after `cache`: every key the chunk's
    queries may see (the cached ones, then the chunk's), the position of each, and the cache after the
    chunk (a window's last `window_size` positions, position p in slot p % window_size; None if not keep)."""
    n, end = cache.entries(window_size), cache.pos + k.shape[2]
    held = torch.arange(n, device=k.device)
    if window_size is not None:  # slot j holds the latest position p < pos with p % window == j
        held = cache.pos - 1 - (cache.pos - 1 - held) % window_size
    positions = torch.cat([held, torch.arange(cache.pos, end, device=k.device)])
    keys, values = (torch.cat([old[:, :, :n], new], 2) for old, new in ((cache.k, k), (cache.v, v)))
    if window_size is None or not keep:
        return keys, values, positions, KVCache(keys, values, end, cache.start) if keep else None
    kept = positions >= end - window_size
    slots = positions[kept] % window_size
    ring_k, ring_v = (t.new_zeros(*t.shape[:2], min(end, window_size), t.shape[3]) for t in (k, v))
    ring_k[:, :, slots], ring_v[:, :, slots] = keys[:, :, kept], values[:, :, kept]
    return keys, values, positions, KVCache(ring_k, ring_v, end, cache.start)


def grown(t: torch.Tensor, capacity: int) -> torch.Tensor:
    """t (B, heads, n, hd) copied into a zeroed cache of `capacity` slots."""
    out = t.new_zeros(*t.shape[:2], capacity, t.shape[3])
    out[:, :, : t.shape[2]] = t
    return out
