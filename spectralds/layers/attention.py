"""Causal sliding-window multi-head attention with rotary position embeddings (RoPE).

Token t attends to tokens t - window + 1 .. t (all earlier tokens when window_size is None). Queries
and keys are rotated by their position in the sequence, so attention scores depend on positions only
through their difference. Training kernels (`kernel`, "auto" picks by device and availability):
flash-attn on CUDA fp16/bf16 when it is installed; else on CUDA FlexAttention (compiled; its block mask
skips the blocks outside the window, and the soft cap is a score_mod); else PyTorch SDPA (is_causal for
full attention, an explicit mask for a window), or plain math when a soft cap is set (SDPA has none).
FlexAttention has no CPU backward in torch 2.13 (its CPU forward runs eager, unfused), so "auto" never
takes it on CPU; "flex" forces it (tests compare it with SDPA there, without gradients).
Decoding keeps a KV cache of at most `window_size` entries, stored after rotation. It is preallocated
and written in place (a ring buffer for a window, a buffer that doubles for full attention), so a step
does not copy the cache; after rotation the order of the cached entries does not matter to attention.
Prompts of different lengths share one cache, from a left-padded prefill (`start`) or merged
(`merge_caches`): each is right-aligned at the longest, its padding masked and its queries and keys
rotated by its own position. `static_state` turns a window's
cache into a `RingKVCache`, whose every field (the position too) is a fixed-shape tensor: a step on it
can be recorded once as a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spectralds.errors import UserError, check_choice, check_float, check_int
from spectralds.layers.kv_cache import KVCache, RingKVCache, grown, merge_caches
from spectralds.layers.registry import SequenceLayer, check_start, padding_mask, register_layer

try:
    from flash_attn import flash_attn_func
except ImportError:  # optional dependency: spectralds[gpu]
    flash_attn_func = None
try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch without FlexAttention
    create_block_mask = flex_attention = None

KERNELS = ("auto", "flash", "flex", "sdpa", "math")
_compiled_flex = None  # flex_attention is only fused under torch.compile: compiled once per process


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate channel pairs (i, i + head_dim/2) of x (..., T, head_dim) by positions * theta^(-2i/hd).

    positions: (T,), or any shape broadcasting against x's leading dims, e.g. (batch, 1, 1) per sequence.
    """
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float64, device=x.device) / half)
    angles = positions.to(torch.float64)[..., None] * freqs  # float64: exact angles at large positions
    cos, sin = _at_least_float32(angles.cos(), x.dtype), _at_least_float32(angles.sin(), x.dtype)
    x1, x2 = _at_least_float32(x[..., :half]), _at_least_float32(x[..., half:])
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def _at_least_float32(t: torch.Tensor, like: torch.dtype | None = None) -> torch.Tensor:
    """Half-precision math (RoPE, softmax logits) runs in float32; float64 stays float64."""
    return t.to(torch.promote_types(like or t.dtype, torch.float32))


def window_mask(T: int, window: int | None, device: torch.device | None = None) -> torch.Tensor:
    """(T, T) boolean, True where query t may attend to key s: t - window < s <= t."""
    lag = torch.arange(T, device=device)[:, None] - torch.arange(T, device=device)[None, :]
    return (lag >= 0) & (lag < window) if window is not None else lag >= 0


def banded_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, dropout: float = 0.0
) -> torch.Tensor:
    """Sliding-window SDPA in query blocks of `window`: block b >= 1 attends to the 2 windows of keys
    ending with it under one (W, 2W) band mask, block 0 is plain causal; the work is about 2 T window
    rather than T^2, and no (T, T) mask is built."""
    T, W, heads = q.shape[2], window, q.shape[1]
    first = F.scaled_dot_product_attention(q[:, :, :W], k[:, :, :W], v[:, :, :W], dropout_p=dropout,
                                           is_causal=True)
    blocks = -(-T // W) - 1
    pad = (blocks + 1) * W - T  # the last block padded at the end; its extra rows are dropped
    rest = F.pad(q[:, :, W:], (0, 0, 0, pad)).unflatten(2, (blocks, W)).flatten(1, 2)  # (B, H nb, W, hd)
    # keys of block b: positions (b - 1) W .. (b + 1) W - 1
    k, v = (F.pad(t, (0, 0, 0, pad)).unfold(2, 2 * W, W).transpose(-1, -2).flatten(1, 2) for t in (k, v))
    band = window_mask(2 * W, W, q.device)[W:]  # query i of a block is position W + i of its 2W keys
    y = F.scaled_dot_product_attention(rest, k, v, attn_mask=band, dropout_p=dropout)
    return torch.cat([first, y.unflatten(1, (heads, blocks)).flatten(2, 3)], dim=2)[:, :, :T]


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
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        check_int("dim", dim)
        check_int("num_heads", num_heads)
        if dim % num_heads or (dim // num_heads) % 2:
            raise UserError(
                f"dim {dim} must split into num_heads={num_heads} heads of even size (RoPE rotates pairs)"
            )
        for name, value in (("window_size", window_size), ("seq_len", seq_len)):
            if value is not None:
                check_int(name, value)
        check_float("rope_theta", rope_theta, minimum=0, strict=True)
        if softcap is not None:
            check_float("softcap", softcap, minimum=0, strict=True)
        check_float("dropout", dropout, minimum=0, maximum=1)
        self.kernel = check_choice("kernel", kernel, KERNELS)
        self._block_masks: dict[tuple, object] = {}  # FlexAttention: (block mask, score_mod), see _flex
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.window_size, self.seq_len, self.rope_theta = window_size, seq_len, rope_theta
        self.softcap, self.dropout = softcap, dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, T, D) -> q, k, v each (B, heads, T, head_dim), q and k rotated."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        return rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta), v

    def forward(self, x: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        return self._sequence(x, start)[0]  # training builds no KV cache

    def forward_flops(self, batch: int, seq_len: int) -> float:
        """QK^T and AV over the keys each query sees (qkv / o_proj are Linear submodules, counted apart)."""
        w = min(self.window_size or seq_len, seq_len)
        seen = w * (w + 1) // 2 + (seq_len - w) * w  # sum over t of min(t + 1, w)
        return 2 * 2 * batch * self.dim * seen

    def _sequence(
        self, x: torch.Tensor, start: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Outputs (B, T, dim) and the rotated keys and values (B, heads, T, head_dim). start: left
        padding, row b rotated by t - start[b] and its keys before start[b] masked from real queries."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise UserError(f"attention expects input (batch, seq, {self.dim}), got {tuple(x.shape)}")
        T = x.shape[1]
        if self.seq_len is not None and T > self.seq_len:
            raise UserError(f"sequence length {T} exceeds the attention seq_len {self.seq_len}")
        positions = torch.arange(T, device=x.device)
        if start is not None:
            check_start(start, x.shape[0], T)
            positions = (positions - start[:, None])[:, None]  # (B, 1, T): each row from its first token
        q, k, v = self._qkv(x, positions)
        y = self._attend(q, k, v, start)  # (B, heads, T, head_dim)
        return self.o_proj(y.transpose(1, 2).flatten(2)), k, v

    def prefill(self, x: torch.Tensor, start: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
        """Outputs for a prompt and a cache holding its last `window_size` keys and values (and `start`,
        so later steps keep each row's own positions and masks)."""
        y, k, v = self._sequence(x, start)
        T = x.shape[1]
        keep = T if self.window_size is None else min(T, self.window_size)
        # Kept entries are copied (no view pinning the whole prompt's keys) and rolled into ring order.
        shift = 0 if self.window_size is None else (T - keep) % self.window_size
        k, v = (t[:, :, T - keep :].roll(shift, dims=2) for t in (k, v))
        return y, KVCache(k, v, T, start)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor | None = None
    ) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        kernel = self._kernel_for(q, p)
        if start is not None and kernel in ("flash", "flex"):  # a per-row padding mask: SDPA or math
            kernel = "sdpa" if self.softcap is None else "math"
        if kernel == "flash":
            window = (-1, -1) if self.window_size is None else (self.window_size - 1, 0)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # flash-attn wants (B, T, heads, hd)
            y = flash_attn_func(
                q, k, v, dropout_p=p, causal=True, window_size=window, softcap=self.softcap or 0.0
            )
            return y.transpose(1, 2)
        if kernel == "flex":
            return self._flex(q, k, v)
        if kernel == "sdpa" and self.window_size is None and start is None:  # no mask: CUDA's flash backend
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        if kernel == "sdpa" and start is None and q.shape[2] > 2 * self.window_size:
            return banded_sdpa(q, k, v, self.window_size, p)
        mask = window_mask(q.shape[2], self.window_size, q.device)
        if start is not None:  # (B, 1, T, T): real queries see real keys; padded ones only padding
            pad = padding_mask(start, q.shape[2])
            mask = mask & (~pad[:, None, None, :] | pad[:, None, :, None])
        if kernel == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        scores = _at_least_float32(q @ k.transpose(-1, -2)) * self.head_dim**-0.5
        if self.softcap is not None:
            scores = self.softcap * torch.tanh(scores / self.softcap)
        weights = F.dropout(scores.masked_fill(~mask, float("-inf")).softmax(-1), p)
        return weights.to(v.dtype) @ v

    def _kernel_for(self, q: torch.Tensor, dropout: float) -> str:
        """The kernel `self.kernel` asks for, checked; "auto": the fastest one that applies."""
        kernel = check_choice("kernel", self.kernel, KERNELS)
        half = q.dtype in (torch.float16, torch.bfloat16)
        if kernel == "auto":
            if flash_attn_func is not None and q.is_cuda and half:
                return "flash"
            # FlexAttention's GPU kernels want a power-of-two head size of at least 16.
            hd = self.head_dim
            if flex_attention is not None and q.is_cuda and not dropout and hd >= 16 and not hd & (hd - 1):
                return "flex"
            return "math" if self.softcap is not None else "sdpa"
        if kernel == "flash" and (flash_attn_func is None or not q.is_cuda or not half):
            raise UserError("kernel='flash' needs flash-attn installed, a CUDA device and fp16/bf16 inputs")
        if kernel == "flex" and (flex_attention is None or dropout):
            raise UserError("kernel='flex' needs torch.nn.attention.flex_attention and no attention dropout")
        if kernel == "flex" and not q.is_cuda and torch.is_grad_enabled() and q.requires_grad:
            raise UserError("kernel='flex' has no backward on CPU in this torch; use 'sdpa' to train there")
        if kernel == "sdpa" and self.softcap is not None:
            raise UserError("kernel='sdpa' has no logit soft cap; use 'math', 'flex' or 'auto'")
        return kernel

    def _flex(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """FlexAttention with a cached causal (windowed) block mask; compiled on CUDA (eager is unfused)."""
        global _compiled_flex
        T, window, cap = q.shape[2], self.window_size, self.softcap
        key = (T, q.device, window, cap)  # window and cap are plain attributes: a change rebuilds
        if key not in self._block_masks:
            def keep(b, h, q_idx, kv_idx):
                causal = q_idx >= kv_idx
                return causal if window is None else causal & (q_idx - kv_idx < window)

            def capped(s, b, h, q_idx, kv_idx):
                return cap * torch.tanh(s / cap)

            # One score_mod object per layer and length: a new function per call would recompile.
            mask = create_block_mask(keep, None, None, T, T, device=q.device)
            self._block_masks = {key: (mask, None if cap is None else capped)}
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
        mask = None
        if state.start is not None:  # the position each slot holds; padding (before start) is masked
            held = torch.arange(valid, device=x_t.device)
            if self.window_size is not None:
                held = state.pos - (state.pos - held) % self.window_size
            mask = held >= state.start[:, None]
        y = self._attend_cache(q, cache_k[:, :, :valid], cache_v[:, :, :valid], mask)
        return self.o_proj(y.flatten(1)), KVCache(cache_k, cache_v, state.pos + 1, state.start)

    def _ring_step(self, x_t: torch.Tensor, state: RingKVCache) -> tuple[torch.Tensor, RingKVCache]:
        """The step on fixed shapes: no Python number depends on the position (CUDA-graph safe)."""
        batch, window = x_t.shape[0], state.k.shape[2]
        q, k, v = self._qkv(x_t[:, None], state.pos[:, None, None])
        slot = (state.pos % window).view(batch, 1, 1, 1).expand(batch, self.num_heads, 1, self.head_dim)
        state.k.scatter_(2, slot, k)
        state.v.scatter_(2, slot, v)
        # Slot j is filled once position j was: before the ring wraps, j <= pos; after, every slot.
        mask = torch.arange(window, device=x_t.device) <= state.pos[:, None]
        y = self._attend_cache(q, state.k, state.v, mask)
        return self.o_proj(y.flatten(1)), RingKVCache(state.k, state.v, state.pos + 1)

    def _attend_cache(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """One query per sequence (B, heads, 1, hd) against cached keys; mask (B, slots) or None."""
        scores = _at_least_float32(q @ keys.transpose(-1, -2)) * self.head_dim**-0.5  # (B, heads, 1, slots)
        if self.softcap is not None:
            scores = self.softcap * torch.tanh(scores / self.softcap)
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
