"""Pre-norm residual block (sequence mixer + MLP) and its parts: RMSNorm and the gated MLP (SwiGLU)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spectralds.errors import UserError, check_bool, check_choice, check_float
from spectralds.layers.registry import SequenceLayer, check_continuation, padding_mask

MLP_ACTIVATIONS = ("silu", "gelu_tanh")


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in at least float32.

    eps=None: the machine epsilon of the input's dtype, as `torch.nn.RMSNorm(eps=None)` has it (1.2e-7 in
    float32, 7.8e-3 in bfloat16), so a model trained that way (Flash STU's references) is reproduced.
    """

    def __init__(self, dim: int, eps: float | None = 1e-6) -> None:
        super().__init__()
        if eps is not None:
            check_float("norm_eps", eps, minimum=0.0)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)
        return (h * self.weight).to(x.dtype)


class SwiGLU(nn.Module):
    """w2(act(w1 x) * w3 x): w1 the gate, w3 the up and w2 the down projection.

    activation "silu" (SwiGLU, the default) or "gelu_tanh" (GELU with its tanh approximation, the gate
    of the Flash STU references).
    """

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False, activation: str = "silu") -> None:
        super().__init__()
        self.activation = check_choice("mlp_activation", activation, MLP_ACTIVATIONS)
        check_bool("mlp_bias", bias)
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.w1(x)
        gate = F.silu(gate) if self.activation == "silu" else F.gelu(gate, approximate="tanh")
        return self.w2(gate * self.w3(x))


def continued_prefill(
    mixer: nn.Module, x: torch.Tensor, state: Any, keep_state: bool = True
) -> tuple[torch.Tensor, Any]:
    """`mixer.prefill(x, state=state, keep_state=keep_state)`; a layer whose own prefill takes no
    `keep_state` keeps its state, and one that takes no `state` (written before it existed) continues by
    the protocol's default, its steps."""
    parameters = inspect.signature(mixer.prefill).parameters
    if "keep_state" in parameters:
        return mixer.prefill(x, state=state, keep_state=keep_state)
    if "state" in parameters:
        return mixer.prefill(x, state=state)
    if not isinstance(mixer, SequenceLayer):
        raise UserError(f"{type(mixer).__name__}.prefill takes no `state`: it cannot continue a prefill")
    return SequenceLayer.prefill(mixer, x, state=state)


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
        norm_eps: float | None = 1e-6,
        dropout: float = 0.0,
        prenorm: bool = True,
        mlp_activation: str = "silu",
        mlp_bias: bool = False,
    ) -> None:
        super().__init__()
        check_choice("mlp_activation", mlp_activation, MLP_ACTIVATIONS)  # checked with or without an MLP
        check_bool("mlp_bias", mlp_bias)
        self.norm1 = RMSNorm(dim, norm_eps) if prenorm else nn.Identity()
        self.mixer = mixer
        self.norm2 = RMSNorm(dim, norm_eps) if mlp_hidden else None
        self.mlp = SwiGLU(dim, mlp_hidden, mlp_bias, mlp_activation) if mlp_hidden else None
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

    def prefill(
        self, x: torch.Tensor, start: torch.Tensor | None = None, state: Any = None, keep_state: bool = True
    ) -> tuple[torch.Tensor, Any]:
        """A prompt (batch, seq, dim) through the block; returns outputs and the mixer's state.
        start: left padding (see `SequenceLayer`); state: the mixer's state to continue from (a chunk
        after it, `SequenceLayer.prefill`); keep_state=False: a continuation's outputs only (the state
        may come back None)."""
        if state is not None:
            check_continuation(start, state, x.shape[0], None)  # the mixer checks the batch
            y, state = continued_prefill(self.mixer, self.norm1(x), state, keep_state)
        elif start is None:  # a mixer that takes no `start` still prefills unpadded prompts
            y, state = self.mixer.prefill(self.norm1(x))
        else:
            y, state = self.mixer.prefill(self._mixer_input(x, start), start=start)
        return self._mlp(x + self.dropout(y)), state
