"""Attention over a chunk continuing a KV cache: `SlidingWindowAttention.prefill(x, state=cache)`.

The chunk's queries sit at the positions after the cache's (each row's own, from `KVCache.start`, when
prompts were right-aligned) and see the cached keys and the chunk's own, within the window. Queries run
in blocks of `QUERY_BLOCK`, each against the keys it can see, so a window's scores take O(block x
(window + block)) memory whatever the chunk (full attention: O(block x position)). The cache after the
chunk is `kv_cache.extended`'s: what one prefill over prefix + chunk leaves.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from spectralds.errors import UserError
from spectralds.layers.attention_masks import score_mask
from spectralds.layers.kv_cache import KVCache, extended
from spectralds.layers.registry import check_continuation

QUERY_BLOCK = 256


def prefill_from(
    layer: Any, x: torch.Tensor, cache: KVCache, keep_state: bool = True
) -> tuple[torch.Tensor, KVCache | None]:
    """Outputs (B, T, dim) of the chunk x (B, T, dim) after `cache`, and the cache after it (`cache` is
    left unchanged; keep_state=False: None, none built). `layer`: a
    `spectralds.layers.attention.SlidingWindowAttention`; a CUDA-graph `RingKVCache` it steps through
    instead. Without a soft cap (and backend "math" not pinned) a block's attention is one masked SDPA
    call, else explicit scores."""
    if not isinstance(cache, KVCache):
        raise UserError(f"attention continues from a KVCache, not {type(cache).__name__}")
    check_continuation(None, cache, x.shape[0], cache.k.shape[0], not keep_state)
    layer._check_sequence(x)
    if x.shape[0] != cache.k.shape[0]:  # n continuations of each row (keep_state=False): the keys repeated
        n = x.shape[0] // cache.k.shape[0]
        start = None if cache.start is None else cache.start.repeat(n)
        cache = KVCache(cache.k.repeat(n, 1, 1, 1), cache.v.repeat(n, 1, 1, 1), cache.pos, start)
    T, window = x.shape[1], layer.window_size
    positions = cache.pos + torch.arange(T, device=x.device)
    own = positions if cache.start is None else (positions - cache.start[:, None])[:, None]
    q, k, v = layer._qkv(x, own)
    keys, values, held, after = extended(cache, k, v, window, keep_state)
    cached, slopes, out = keys.shape[2] - T, layer.alibi_slopes(q), []
    fused = layer.softcap is None and layer.backend != "math"
    for first in range(0, T, QUERY_BLOCK):
        last = min(T, first + QUERY_BLOCK)
        lo = 0 if window is None else max(0, first - window + 1)  # the chunk's keys this block can see
        index = torch.cat([torch.arange(cached), cached + torch.arange(lo, last)]).to(x.device)
        lag = positions[first:last, None] - held[index]  # (queries, keys)
        mask = (lag >= 0) if window is None else (lag >= 0) & (lag < window)
        if cache.start is not None:  # (B, 1, queries, keys): a row's padding is never seen
            mask = mask & (held[index] >= cache.start[:, None])[:, None, None]
        if fused:
            bias = score_mask(lag, mask, slopes, q.dtype)
            out.append(F.scaled_dot_product_attention(q[:, :, first:last], keys[:, :, index],
                                                      values[:, :, index], attn_mask=bias))
            continue
        scores = layer._capped_scores(q[:, :, first:last], keys[:, :, index], slopes, lag)
        weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        out.append(weights.to(values.dtype) @ values[:, :, index])
    return layer.o_proj(torch.cat(out, 2).transpose(1, 2).flatten(2)), after
