"""Causal sliding-window multi-head attention; positions by RoPE, by ALiBi, or none.

Token t attends to tokens t - window + 1 .. t (all earlier ones when window_size is None). `positions`:
"rope" rotates queries and keys by their position, "alibi" adds -slope_h (t - s) to each score after the
soft cap (as flash-attn does), "none" leaves order to the causal mask; scores depend on positions only
through t - s (see `spectralds.layers.positions`). Training backends (`backend`, "auto" picks by device
and availability): flash-attn on CUDA fp16/bf16 when installed; else on CUDA FlexAttention (compiled;
its block mask skips blocks outside the window, soft cap and ALiBi are a score_mod); else PyTorch SDPA
(is_causal for full attention, an explicit mask for a window or ALiBi), or plain math when a soft cap
is set (SDPA has none). FlexAttention has no CPU backward in torch 2.13 (its CPU forward runs eager,
unfused), so "auto" never takes it on CPU; "flex" forces it (tests compare it with SDPA there).
Decoding keeps a KV cache of at most `window_size` entries, stored after rotation, preallocated and
written in place (a ring buffer for a window, a buffer that doubles for full attention): a step does not
copy the cache, and the order of cached entries does not matter (ALiBi needs only each slot's lag).
Prompts of different lengths share one cache, from a left-padded prefill (`start`) or merged
(`merge_caches`): each is right-aligned at the longest, its padding masked and its queries and keys
rotated by its own position. `static_state` turns a window's cache into a `RingKVCache`, whose every
field (the position too) is a fixed-shape tensor: a step on it can be recorded once as a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spectralds.errors import UserError, check_choice, check_float, check_int
from spectralds.layers.attention_continue import prefill_from
from spectralds.layers.kv_cache import KVCache, RingKVCache, grown, merge_caches
from spectralds.layers.positions import POSITIONS, alibi_bias, alibi_slopes, at_least_float32, lags, rope
from spectralds.layers.registry import (
    SequenceLayer,
    check_continuation,
    check_start,
    padding_mask,
    register_layer,
)
from spectralds.ops.costs import attention_flops

try:
    from flash_attn import flash_attn_func
except ImportError:  # optional dependency: spectralds[gpu]
    flash_attn_func = None
from spectralds.layers.attention_masks import banded_sdpa, flex_attention, flex_masks, score_mask, window_mask

BACKENDS = ("auto", "flash", "flex", "sdpa", "math")
_compiled_flex = None  # flex_attention is only fused under torch.compile: compiled once per process


@register_layer("attn")
class SlidingWindowAttention(SequenceLayer):
    """Multi-head causal attention over a sliding window, with RoPE and an optional logit soft cap.

    seq_len, when set, is the longest input `forward` accepts (decoding steps are not limited).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        window_size: int | None = None,
        seq_len: int | None = None,
        rope_theta: float = 10000.0,
        softcap: float | None = None,
        dropout: float = 0.0,
        bias: bool = False,
        backend: str = "auto",
        positions: str = "rope",
        alibi_slope_scale: float = 1.0,
    ) -> None:
        super().__init__()
        check_int("dim", dim)
        check_int("num_heads", num_heads)
        self.positions = check_choice("positions", positions, POSITIONS)
        self.alibi_slope_scale = check_float("alibi_slope_scale", alibi_slope_scale, minimum=0, strict=True)
        if positions != "alibi" and alibi_slope_scale != 1.0:
            raise UserError(f"alibi_slope_scale is for positions='alibi', not {positions!r}")
        if dim % num_heads or (positions == "rope" and (dim // num_heads) % 2):
            pairs = " of even size (RoPE rotates pairs)" if positions == "rope" else ""
            raise UserError(f"dim {dim} must split into num_heads={num_heads} heads{pairs}")
        for name, value in (("window_size", window_size), ("seq_len", seq_len)):
            if value is not None:
                check_int(name, value)
        check_float("rope_theta", rope_theta, minimum=0, strict=True)
        if softcap is not None:
            check_float("softcap", softcap, minimum=0, strict=True)
        check_float("dropout", dropout, minimum=0, maximum=1)
        self.backend = check_choice("backend", backend, BACKENDS)
        self._block_masks: dict[tuple, object] = {}  # FlexAttention: (block mask, score_mod), see _flex
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.window_size, self.seq_len, self.rope_theta = window_size, seq_len, rope_theta
        self.softcap, self.dropout = softcap, dropout
        self._slopes: dict[tuple, torch.Tensor] = {}  # float64 per device, made before any CUDA graph
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, T, D) -> q, k, v each (B, heads, T, head_dim), q and k rotated (RoPE)."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        if self.positions != "rope":
            return q, k, v
        return rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta), v

    def alibi_slopes(self, like: torch.Tensor) -> torch.Tensor | None:
        """(heads,) ALiBi slopes on like's device, in its dtype or float32 at least; None without ALiBi."""
        if self.positions != "alibi":
            return None
        key = (like.device, self.alibi_slope_scale)  # a plain attribute: a change makes new slopes
        if key not in self._slopes:
            slopes = alibi_slopes(self.num_heads, self.alibi_slope_scale)
            self._slopes[key] = torch.tensor(slopes, dtype=torch.float64, device=like.device)
        return at_least_float32(self._slopes[key], like.dtype)

    def forward(self, x: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        return self._sequence(x, start)[0]  # training builds no KV cache

    def forward_flops(self, batch: int, seq_len: int) -> float:
        """QK^T and AV over the keys each query sees (qkv / o_proj are Linear submodules, counted apart)."""
        return attention_flops(batch, seq_len, self.dim, self.window_size)

    def _sequence(
        self, x: torch.Tensor, start: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Outputs (B, T, dim) and the rotated keys and values (B, heads, T, head_dim). start: left
        padding, row b rotated by t - start[b] and its keys before start[b] masked from real queries."""
        self._check_sequence(x)
        T = x.shape[1]
        positions = torch.arange(T, device=x.device)
        if start is not None:
            check_start(start, x.shape[0], T)
            positions = (positions - start[:, None])[:, None]  # (B, 1, T): each row from its first token
        q, k, v = self._qkv(x, positions)
        y = self._attend(q, k, v, start)  # (B, heads, T, head_dim)
        return self.o_proj(y.transpose(1, 2).flatten(2)), k, v

    def _check_sequence(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise UserError(f"attention expects input (batch, seq, {self.dim}), got {tuple(x.shape)}")
        if self.seq_len is not None and x.shape[1] > self.seq_len:
            raise UserError(f"sequence length {x.shape[1]} exceeds the attention seq_len {self.seq_len}")

    def prefill(
        self, x: torch.Tensor, start: torch.Tensor | None = None, state: KVCache | RingKVCache | None = None,
        keep_state: bool = True,
    ) -> tuple[torch.Tensor, KVCache | RingKVCache | None]:
        """Outputs for a prompt and a cache holding its last `window_size` keys and values (and `start`,
        so later steps keep each row's own positions and masks). state: continue from that cache
        (`SequenceLayer.prefill`): the chunk's queries see the cached keys and their own, at positions
        after the cache's (a CUDA-graph `RingKVCache` is stepped through); keep_state=False: no new cache."""
        ring = isinstance(state, RingKVCache)
        check_continuation(start, state, x.shape[0], state.k.shape[0] if ring else None)  # else: below
        if ring:
            return super().prefill(x, state=state)
        if state is not None:  # spectralds.layers.attention_continue
            return prefill_from(self, x, state, keep_state)
        y, k, v = self._sequence(x, start)
        T = x.shape[1]
        keep = T if self.window_size is None else min(T, self.window_size)
        # Kept entries are copied (no view pinning the whole prompt's keys) and rolled into ring order.
        shift = 0 if self.window_size is None else (T - keep) % self.window_size
        k, v = (t[:, :, T - keep :].roll(shift, dims=2) for t in (k, v))
        return y, KVCache(k, v, T, start)

    def continues_repeated(self) -> bool:  # `attention_continue.prefill_from`
        return True

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor | None = None
    ) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        backend = self._backend_for(q, p)
        if start is not None and backend in ("flash", "flex"):  # a per-row padding mask: SDPA or math
            backend = "sdpa" if self.softcap is None else "math"
        slopes = self.alibi_slopes(q)
        if backend == "flash":  # flash-attn adds the ALiBi bias after its soft cap, in float32
            window = (-1, -1) if self.window_size is None else (self.window_size - 1, 0)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # flash-attn wants (B, T, heads, hd)
            alibi = None if slopes is None else slopes.float()
            y = flash_attn_func(q, k, v, dropout_p=p, causal=True, window_size=window,
                                softcap=self.softcap or 0.0, alibi_slopes=alibi)
            return y.transpose(1, 2)
        if backend == "flex":
            return self._flex(q, k, v, slopes)
        plain = backend == "sdpa" and start is None  # no per-row padding mask
        if plain and self.window_size is None and slopes is None:  # no mask tensor: CUDA's flash backend
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        if plain and self.window_size is not None and q.shape[2] > 2 * self.window_size:
            return banded_sdpa(q, k, v, self.window_size, p, slopes)
        lag, mask = lags(q.shape[2], q.device), window_mask(q.shape[2], self.window_size, q.device)
        if start is not None:  # (B, 1, T, T): real queries see real keys; padded ones only padding
            pad = padding_mask(start, q.shape[2])
            mask = mask & (~pad[:, None, None, :] | pad[:, None, :, None])
        if backend == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=score_mask(lag, mask, slopes, q.dtype),
                                                  dropout_p=p)
        scores = self._capped_scores(q, k, slopes, lag)
        weights = F.dropout(scores.masked_fill(~mask, float("-inf")).softmax(-1), p)
        return weights.to(v.dtype) @ v

    def _backend_for(self, q: torch.Tensor, dropout: float) -> str:
        """The backend `self.backend` asks for, checked; "auto": the fastest one that applies."""
        backend = check_choice("backend", self.backend, BACKENDS)
        half = q.dtype in (torch.float16, torch.bfloat16)
        if backend == "auto":
            if flash_attn_func is not None and q.is_cuda and half:
                return "flash"
            # FlexAttention's GPU code wants a power-of-two head size of at least 16.
            hd = self.head_dim
            if flex_attention is not None and q.is_cuda and not dropout and hd >= 16 and not hd & (hd - 1):
                return "flex"
            return "math" if self.softcap is not None else "sdpa"
        if backend == "flash" and (flash_attn_func is None or not q.is_cuda or not half):
            raise UserError("backend='flash' needs flash-attn installed, a CUDA device and fp16/bf16 inputs")
        if backend == "flex" and (flex_attention is None or dropout):
            raise UserError("backend='flex' needs torch.nn.attention.flex_attention and no attention dropout")
        if backend == "flex" and not q.is_cuda and torch.is_grad_enabled() and q.requires_grad:
            raise UserError("backend='flex' has no backward on CPU in this torch; use 'sdpa' to train there")
        if backend == "sdpa" and self.softcap is not None:
            raise UserError("backend='sdpa' has no logit soft cap; use 'math', 'flex' or 'auto'")
        return backend

    def _capped_scores(
        self, q: torch.Tensor, k: torch.Tensor, slopes: torch.Tensor | None, lag: torch.Tensor | None
    ) -> torch.Tensor:
        """Scaled q.k scores in float32 at least, soft-capped, then plus the ALiBi bias for `lag`."""
        scores = at_least_float32(q @ k.transpose(-1, -2)) * self.head_dim**-0.5
        if self.softcap is not None:
            scores = self.softcap * torch.tanh(scores / self.softcap)
        return scores if slopes is None else scores + alibi_bias(slopes.to(scores.dtype), lag)

    def _flex(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor | None
              ) -> torch.Tensor:
        """FlexAttention with a cached causal (windowed) block mask; compiled on CUDA (eager is unfused)."""
        global _compiled_flex
        T, window, cap = q.shape[2], self.window_size, self.softcap
        # window, cap and the slopes are plain attributes: a change rebuilds
        key = (T, q.device, q.dtype, window, cap, self.positions, self.alibi_slope_scale)
        if key not in self._block_masks:  # one score_mod object per layer and length: no recompiles
            self._block_masks = {key: flex_masks(T, window, cap, slopes, q.device)}
        if q.is_cuda and _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        attend = _compiled_flex if q.is_cuda else flex_attention
        mask, score_mod = self._block_masks[key]
        return attend(q, k, v, block_mask=mask, score_mod=score_mod)

    def init_state(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        empty = torch.zeros(batch_size, self.num_heads, 0, self.head_dim, device=device, dtype=dtype)
        return KVCache(empty, empty, 0)

    def step(
        self, x_t: torch.Tensor, state: KVCache | RingKVCache
    ) -> tuple[torch.Tensor, KVCache | RingKVCache]:
        """One token against the cache, updated in place (grown when full, not copied per token)."""
        if isinstance(state, RingKVCache):
            return self._ring_step(x_t, state)
        positions = torch.tensor([state.pos], device=x_t.device)
        if state.start is not None:  # right-aligned prompts: each query at its own position
            positions = (state.pos - state.start)[:, None, None]
        q, k, v = self._qkv(x_t[:, None], positions)
        cache_k, cache_v = state.k, state.v
        n = state.entries(self.window_size)
        slot = n if self.window_size is None else state.pos % self.window_size
        if slot >= cache_k.shape[2]:  # full: double the capacity (at most the window)
            capacity = max(16, 2 * cache_k.shape[2])
            capacity = capacity if self.window_size is None else min(capacity, self.window_size)
            cache_k, cache_v = (grown(t, capacity) for t in (cache_k, cache_v))
        cache_k[:, :, slot], cache_v[:, :, slot] = k[:, :, 0], v[:, :, 0]
        valid = min(n + 1, cache_k.shape[2])
        # The position each slot holds: slot j, or with a window the latest p <= pos with p % window == j.
        held = torch.arange(valid, device=x_t.device)
        if self.window_size is not None:
            held = state.pos - (state.pos - held) % self.window_size
        mask = None if state.start is None else held >= state.start[:, None]  # padding (before start) masked
        lag = (state.pos - held)[None]  # the same for every sequence: start shifts query and keys alike
        y = self._attend_cache(q, cache_k[:, :, :valid], cache_v[:, :, :valid], mask, lag)
        return self.o_proj(y.flatten(1)), KVCache(cache_k, cache_v, state.pos + 1, state.start)

    def _ring_step(self, x_t: torch.Tensor, state: RingKVCache) -> tuple[torch.Tensor, RingKVCache]:
        """The step on fixed shapes: no Python number depends on the position (CUDA-graph safe)."""
        batch, window = x_t.shape[0], state.k.shape[2]
        q, k, v = self._qkv(x_t[:, None], state.pos[:, None, None])
        slot = (state.pos % window).view(batch, 1, 1, 1).expand(batch, self.num_heads, 1, self.head_dim)
        state.k.scatter_(2, slot, k)
        state.v.scatter_(2, slot, v)
        # Slot j is filled once position j was: before the ring wraps, j <= pos; after, every slot.
        slots = torch.arange(window, device=x_t.device)
        mask = slots <= state.pos[:, None]
        y = self._attend_cache(q, state.k, state.v, mask, (state.pos[:, None] - slots) % window)
        return self.o_proj(y.flatten(1)), RingKVCache(state.k, state.v, state.pos + 1)

    def _attend_cache(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
        lag: torch.Tensor,
    ) -> torch.Tensor:
        """One query per sequence (B, heads, 1, hd) against cached keys; mask (B, slots) or None; lag
        (B or 1, slots): how far back each slot's key is (for ALiBi)."""
        scores = self._capped_scores(q, keys, self.alibi_slopes(q), lag[:, None])  # (B, heads, 1, slots)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
        return scores.softmax(-1).to(values.dtype) @ values

    def merge_states(self, states: list[KVCache]) -> KVCache:
        """The caches of prompts prefilled apart, right-aligned at the longest (`merge_caches`)."""
        return merge_caches(states, self.window_size)

    def static_state(self, state: KVCache | RingKVCache) -> RingKVCache:
        """The same cache as a `RingKVCache` (fixed shapes), for a step recorded as a CUDA graph."""
        if isinstance(state, RingKVCache):
            return state
        if self.window_size is None:
            raise UserError("full attention cannot decode from a CUDA graph: its KV cache grows with "
                            "every token, and a recorded graph replays fixed shapes (use a window)")
        window, batch = self.window_size, state.k.shape[0]
        start = state.start if state.start is not None else torch.zeros(batch, dtype=torch.long)
        start = start.to(state.k.device)
        # Sequence b's position p sits in slot (p + start[b]) % window (aligned); the ring wants p % window.
        source = (torch.arange(window, device=state.k.device) + start[:, None]) % window  # (B, window)
        index = source[:, None, :, None].expand(batch, self.num_heads, window, self.head_dim)
        k, v = (grown(t, window).gather(2, index) for t in (state.k, state.v))
        return RingKVCache(k, v, state.pos - start)

