"""The autoregressive (AR) component of the STU (Agarwal et al., "Spectral state space models", 2023),
as an option of the STU / STU-T / LDS layers (`ar_order=p`, default 0: no AR term, the plain layer).

With s_t the layer's spectral output (the convolutions read out by M, or the LDS that replaces them):

    y_t = s_t + sum_{j=0..p-1} x_{t-j} @ M_u[j] + sum_{i=1..p} y_{t-i} @ M_y[i-1]

Inputs enter at lags 0..p-1 (the STU paper's u_{t+1-i}, i = 1..p); outputs at lags 1..p: the layer's own
past outputs, so y is a recursion. Both M start at zero, so a fresh layer computes the plain layer's function.

Training runs the recursion in parallel, exactly (`spectralds.ops.ar_scan.ar_scan`, a chunked scan of the
companion recursion, checked against the step-by-step `ar_ref`). No stability is imposed on M_y: an
unstable recursion diverges in training as it would in decoding (its zero init starts it stable).

Decoding is O(p) per token: the state keeps the last p - 1 inputs and the last p outputs besides the
wrapped layer's own state (`ARDecodeState`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from spectralds.errors import UserError, check_int
from spectralds.layers.lds import LDS, LDSExact, LDSTensordot, lds_class
from spectralds.layers.registry import check_continuation, register_layer
from spectralds.ops.ar_scan import ar_scan


@dataclass
class ARDecodeState:
    """Decoding state of a layer with AR terms: the wrapped layer's state, the last p - 1 inputs
    (batch, p - 1, dim) and the last p outputs (batch, p, dim_out), oldest first."""

    inner: Any
    inputs: torch.Tensor
    outputs: torch.Tensor


def _last(x: torch.Tensor, n: int) -> torch.Tensor:
    """The last n steps of x (B, T, C), zero-padded in front when T < n."""
    steps = x.shape[1]
    return nn.functional.pad(x[:, max(0, steps - n) :], (0, 0, max(0, n - steps), 0))


# The roles of the AR weights' axes (as `LDS.projections`): "in" input channels, "out" output channels.
AR_AXES = {"M_u": ("", "in", "out"), "M_y": ("", "out", "out")}


class AutoRegressive(nn.Module):
    """M_u (p, dim, dim_out) on inputs at lags 0..p-1, M_y (p, dim_out, dim_out) on outputs at lags 1..p."""

    def __init__(self, dim: int, dim_out: int, order: int) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("dim_out", dim_out), ("ar_order", order)):
            check_int(name, value)
        self.dim, self.dim_out, self.order = dim, dim_out, order
        self.chunk = 8  # chunk length of the scan (cost ~ B T d^2 (chunk + 2p) + the scan over T / chunk)
        # Zero init: a new layer computes exactly the plain layer's function until trained.
        self.M_u = nn.Parameter(torch.zeros(order, dim, dim_out))
        self.M_y = nn.Parameter(torch.zeros(order, dim_out, dim_out))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, dim_out={self.dim_out}, order={self.order}"

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Outputs y (B, T, dim_out) for inputs x (B, T, dim) and spectral outputs s (B, T, dim_out)."""
        return ar_scan(x, s, self.M_u, self.M_y, self.chunk)

    def history(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoding history after a prompt: its last p - 1 inputs and last p outputs, zero-padded."""
        return _last(x, self.order - 1), _last(y, self.order)

    def continued(
        self, x: torch.Tensor, s: torch.Tensor, inputs: torch.Tensor, outputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A chunk after earlier steps: outputs y (B, T, dim_out) for inputs x and spectral outputs s
        following the history (`inputs`, `outputs`, as `step` keeps it), and the history after the chunk,
        in the history's dtype. The scan runs from a zero history; what the kept history adds enters the
        drive of the first p outputs (the recursion is linear)."""
        dtype, p = outputs.dtype, self.order
        x, s = x.to(dtype), s.to(dtype)
        carried = []
        for t in range(min(x.shape[1], p)):  # y_t's terms reaching before the chunk: x_{t-j}, y_{t-i} < 0
            term = sum(outputs[:, t - i] @ self.M_y[i - 1].to(dtype) for i in range(t + 1, p + 1))
            carried.append(term + sum(inputs[:, t - j] @ self.M_u[j].to(dtype) for j in range(t + 1, p)))
        drive = s + nn.functional.pad(torch.stack(carried, 1), (0, 0, 0, x.shape[1] - len(carried)))
        y = ar_scan(x, drive, self.M_u, self.M_y, self.chunk)
        return y, *self.history(torch.cat([inputs, x], 1), torch.cat([outputs, y], 1))

    def init_history(
        self, batch: int, device: torch.device | None, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.zeros(batch, self.order - 1, self.dim, device=device, dtype=dtype),
                torch.zeros(batch, self.order, self.dim_out, device=device, dtype=dtype))

    def step(
        self, x_t: torch.Tensor, s_t: torch.Tensor, inputs: torch.Tensor, outputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token: y_t from x_t, s_t and the history; returns y_t and the shifted history."""
        dtype = outputs.dtype
        y = s_t.to(dtype) + x_t.to(dtype) @ self.M_u[0].to(dtype)
        for j in range(1, self.order):
            y = y + inputs[:, -j] @ self.M_u[j].to(dtype)
        for i in range(1, self.order + 1):
            y = y + outputs[:, -i] @ self.M_y[i - 1].to(dtype)
        inputs = torch.cat([inputs[:, 1:], x_t.to(dtype)[:, None]], dim=1) if self.order > 1 else inputs
        return y, inputs, torch.cat([outputs[:, 1:], y[:, None]], dim=1)


# The STU paper's AR terms reach a few steps back (orders 2-3). The scan's cost grows faster than p^2
# (dim 16, seq_len 64, one forward+backward: p=8 0.05 s, 32 0.5 s, 63 3 s), so an order in the
# hundreds would run for minutes: refused when the layer is built.
MAX_AR_ORDER = 32


def make_ar(dim: int, dim_out: int, ar_order: int, seq_len: int | None = None) -> AutoRegressive | None:
    """The AR module of a layer, or None for ar_order=0 (no parameters: checkpoint keys unchanged).
    `ar_order` is at most `MAX_AR_ORDER` and below the layer's `seq_len` (None: no length bound)."""
    check_int("ar_order", ar_order, minimum=0, maximum=MAX_AR_ORDER)
    if seq_len is not None and ar_order >= seq_len:
        raise UserError(f"ar_order must be < seq_len ({seq_len}): lags reach only back to the start, "
                        f"got {ar_order}")
    return AutoRegressive(dim, dim_out, ar_order) if ar_order else None


@contextmanager
def spectral_only(layer: nn.Module) -> Iterator[None]:
    """Inside, `layer` runs without its AR terms (its `forward` gives the spectral part s alone), so a
    decoding routine written for the plain layer (e.g. `futurefill.prefill`) returns s."""
    ar = layer.ar
    layer.ar = None
    try:
        yield
    finally:
        layer.ar = ar


def ar_prefill(
    layer: nn.Module, x: torch.Tensor, inner: Callable[..., tuple[torch.Tensor, Any]],
    state: ARDecodeState | None = None,
) -> tuple[torch.Tensor, ARDecodeState]:
    """Prefill through the plain layer (`inner`, run with the AR terms off), then the AR recursion;
    state: continue from it (`SequenceLayer.prefill`)."""
    if state is not None and not isinstance(state, ARDecodeState):
        raise UserError(f"a layer with AR terms continues from an ARDecodeState, not {type(state).__name__}")
    with spectral_only(layer):
        s, inner_state = inner(x) if state is None else inner(x, state=state.inner)
    with torch.no_grad():
        if state is not None:
            y, inputs, outputs = layer.ar.continued(x, s, state.inputs, state.outputs)
            return y.to(x.dtype), ARDecodeState(inner_state, inputs, outputs)
        y = layer.ar(x, s.to(x.dtype)) if x.shape[1] else s
        hist_dtype = torch.promote_types(x.dtype, torch.float32)
        inputs, outputs = layer.ar.history(x.to(hist_dtype), y.to(hist_dtype))
    return y.to(x.dtype), ARDecodeState(inner_state, inputs, outputs)


def ar_step(
    layer: nn.Module, x_t: torch.Tensor, state: ARDecodeState, inner: Callable[..., tuple[torch.Tensor, Any]]
) -> tuple[torch.Tensor, ARDecodeState]:
    """One token: the plain layer's step (`inner`, AR terms off) gives s_t, the history adds the rest."""
    if not isinstance(state, ARDecodeState):
        raise UserError(f"a layer with AR terms decodes from an ARDecodeState, not {type(state).__name__}")
    with spectral_only(layer):
        s_t, inner_state = inner(x_t, state.inner)
    with torch.no_grad():
        y, inputs, outputs = layer.ar.step(x_t, s_t, state.inputs, state.outputs)
    return y.to(x_t.dtype), ARDecodeState(inner_state, inputs, outputs)


def ar_merge_states(layer: nn.Module, states: list[Any], inner: Callable[[list[Any]], Any]) -> Any:
    """Merged states (`SequenceLayer.merge_states`): `inner` merges the plain layer's states; each AR
    history holds its own prompt's last steps with zeros before, which zero inputs would leave."""
    if layer.ar is None:
        return inner(states)
    if not all(isinstance(s, ARDecodeState) for s in states):
        raise UserError("a layer with AR terms merges ARDecodeStates only")
    inputs, outputs = (torch.cat([getattr(s, name) for s in states]) for name in ("inputs", "outputs"))
    return ARDecodeState(inner([s.inner for s in states]), inputs, outputs)


def ar_init_state(layer: nn.Module, inner_state: Any, batch: int, device: Any, dtype: Any) -> ARDecodeState:
    hist_dtype = torch.promote_types(dtype or torch.float32, torch.float32)
    return ARDecodeState(inner_state, *layer.ar.init_history(batch, device, hist_dtype))


class LDSWithAR(LDS):
    """AR terms over an LDS layer (`LDSExactWithAR`, `LDSTensordotWithAR`): `LDS` (all its arguments) plus
    `ar_order` >= 1; what an STU with `ar_order` distills to (`spectralds.distill.convert`). A separate
    registry name, "lds_ar", keeps "lds" layers unchanged."""

    def __init__(self, *args: Any, ar_order: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_int("ar_order", ar_order)
        self.ar = make_ar(self.dim, self.dim_out, ar_order, self.seq_len).to(self.run_dtype)

    def projection_axes(self) -> dict[str, tuple[str, ...]]:
        return {**super().projection_axes(), **{f"ar.{name}": axes for name, axes in AR_AXES.items()}}

    def spec(self) -> dict:
        return {**super().spec(), "name": "lds_ar", "ar_order": self.ar.order}

    def forward(self, x: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        if self.ar is None:  # inside `spectral_only`: the plain LDS
            return super().forward(x)
        with spectral_only(self):  # the LDS picks its own path (scan or convolution) for s
            s = super().forward(x)
        return self.ar(x.to(self.run_dtype), s.to(self.run_dtype)).to(x.dtype)

    def prefill(
        self, x: torch.Tensor, start: torch.Tensor | None = None, state: ARDecodeState | None = None
    ) -> tuple[torch.Tensor, Any]:
        if self.ar is None:  # inside `spectral_only`: the plain LDS
            return super().prefill(x, start, state)
        if state is not None:
            check_continuation(start, state, x.shape[0], None)  # the LDS checks the batch
            y, state = ar_prefill(self, x.to(self.run_dtype), self.prefill, state)
            return y.to(x.dtype), state
        s, state = super().prefill(x)
        y = self.ar(x.to(self.run_dtype), s.to(self.run_dtype))
        inputs, outputs = self.ar.history(x.to(self.run_dtype).detach(), y.detach())
        return y.to(x.dtype), ARDecodeState(state, inputs, outputs)

    def continues_repeated(self) -> bool:  # its prefill keeps every state (no keep_state)
        return False

    def init_state(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> ARDecodeState:
        inner = super().init_state(batch_size, device, dtype)
        return ar_init_state(self, inner, batch_size, device, self.run_dtype)

    def step(self, x_t: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        if self.ar is None:  # inside `spectral_only`
            return super().step(x_t, state)
        return ar_step(self, x_t, state, self.step)

    def merge_states(self, states: list[ARDecodeState]) -> ARDecodeState:
        return ar_merge_states(self, states, super().merge_states)

    def static_state(self, state: Any) -> ARDecodeState:
        """The state as it is: the LDS tensor and the AR history already have fixed shapes (CUDA graphs)."""
        if not isinstance(state, ARDecodeState) or not isinstance(state.inner, torch.Tensor):
            raise UserError(f"an LDS with AR terms decodes from an ARDecodeState, not {type(state).__name__}")
        return state


class LDSExactWithAR(LDSWithAR, LDSExact):
    """`LDSExact` with AR terms."""


class LDSTensordotWithAR(LDSWithAR, LDSTensordot):
    """`LDSTensordot` with AR terms."""


@register_layer("lds_ar")
def make_lds_ar(
    dim: int, seq_len: int | None = None, num_filters: int = 24, state_dim: int = 80, mode: str = "exact",
    *args: Any, ar_order: int = 1, **kwargs: Any,
) -> LDSWithAR:
    """`make_lds` with AR terms of order `ar_order`."""
    layers = {"exact": LDSExactWithAR, "tensordot": LDSTensordotWithAR}
    return lds_class(mode, layers)(dim, seq_len, num_filters, state_dim, *args, ar_order=ar_order, **kwargs)
