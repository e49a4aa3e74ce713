"""Pre-norm residual block (sequence mixer + MLP) and its parts: RMSNorm and SwiGLU."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spectralds.layers.registry import padding_mask


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in at least float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + self.eps)
        return (h * self.weight).to(x.dtype)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x). SiLU gating (the Flash STU reference falls back to GELU-tanh gating)."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """x = x + mixer(norm1(x)); x = x + mlp(norm2(x)).

    `block.mixer` is any sequence layer (STU, LDS, attention, ...): swapping one for another is a
    single assignment. mlp_hidden=None builds a block without MLP. prenorm=False drops norm1 (an
    identity, no parameters): x = x + mixer(x), so a block of linear mixers stays linear (RMSNorm divides
    each token by its own norm, which sets an error floor when the target is a linear system).
    """

    def __init__(
        self,
        dim: int,
        mixer: nn.Module,
        mlp_hidden: int | None = None,
        norm_eps: float = 1e-6,
        dropout: float = 0.0,
        prenorm: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim, norm_eps) if prenorm else nn.Identity()
        self.mixer = mixer
        self.norm2 = RMSNorm(dim, norm_eps) if mlp_hidden else None
        self.mlp = SwiGLU(dim, mlp_hidden) if mlp_hidden else None
        self.dropout = nn.Dropout(dropout)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.mlp is None else x + self.dropout(self.mlp(self.norm2(x)))

    def _mixer_input(self, x: torch.Tensor, start: torch.Tensor | None) -> torch.Tensor:
        """norm1(x), zero at left-padded positions (before start[b]): what the mixers' `start` assumes."""
        h = self.norm1(x)
        return h if start is None else h.masked_fill(padding_mask(start, x.shape[1])[..., None], 0)

    def forward(self, x: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        if start is None:  # a mixer that takes no `start` still works unpadded
            return self._mlp(x + self.dropout(self.mixer(self.norm1(x))))
        return self._mlp(x + self.dropout(self.mixer(self._mixer_input(x, start), start=start)))

    def init_state(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> Any:
        return self.mixer.init_state(batch_size, device=device, dtype=dtype)

    def step(self, x_t: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """One token (batch, dim) through the block, with the mixer's decoding state."""
        y_t, state = self.mixer.step(self.norm1(x_t), state)
        return self._mlp(x_t + self.dropout(y_t)), state

    def prefill(self, x: torch.Tensor, start: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        """A prompt (batch, seq, dim) through the block; returns outputs and the mixer's state.
        start: left padding (see `SequenceLayer`)."""
        if start is None:
            y, state = self.mixer.prefill(self.norm1(x))
        else:
            y, state = self.mixer.prefill(self._mixer_input(x, start), start=start)
        return self._mlp(x + self.dropout(y)), state
