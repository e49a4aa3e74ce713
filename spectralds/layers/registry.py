"""The layer registry and the decoding interface every sequence layer shares.

Models name their mixers with plain strings ("stu", "lds", "attn", ...) so configs stay
serializable; `build_layer` turns a name into a module. Other projects add layers with
`@register_layer("name")`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from spectralds.errors import UserError, UserTypeError, check_choice

# The decoding algorithms of convolutional layers (STU, STU-T); see `SequenceLayer.decode_method`.
DECODE_METHODS = ("futurefill", "naive")

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_layer(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Class decorator: make a layer buildable as `build_layer(name, **kwargs)`."""

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise UserError(f"layer name {name!r} is already registered to {_REGISTRY[name]!r}")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_layers() -> list[str]:
    return sorted(_REGISTRY)


def build_layer(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered layer; every layer maps (batch, seq, dim) -> (batch, seq, dim)."""
    if not isinstance(name, str):
        raise UserTypeError(f"a layer name must be a string, got {name!r}")
    if name not in _REGISTRY:
        raise UserError(f"unknown layer {name!r}; registered layers: {', '.join(available_layers())}")
    kwargs = _renamed_arguments(name, kwargs)
    layer = _REGISTRY[name](**kwargs)
    layer.build_spec = {"name": name, **kwargs}  # see SequenceLayer.build_spec
    return layer


# Layer arguments renamed since checkpoints were first written: (layer, old name) -> new name. Old
# checkpoints (their layer specs and hparams) and configs still build, with a warning naming the new one.
RENAMED_ARGUMENTS = {("attn", "kernel"): "backend"}


def _renamed_arguments(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    renamed = dict(kwargs)
    for (layer, old), new in RENAMED_ARGUMENTS.items():
        if layer == name and old in renamed:
            if new in renamed:
                raise UserError(f"layer {name!r} got both {old!r} and its new name {new!r}; keep {new!r}")
            warnings.warn(f"layer {name!r}: the argument {old!r} is now called {new!r}", FutureWarning,
                          stacklevel=3)
            renamed[new] = renamed.pop(old)
    return renamed


def layer_spec(layer: nn.Module) -> dict[str, Any] | None:
    """The `build_layer` arguments that rebuild `layer` now (a layer may refine them via `spec()`)."""
    if hasattr(layer, "spec"):
        return layer.spec()
    return getattr(layer, "build_spec", None)


def layer_specs(module: nn.Module) -> dict[str, dict[str, Any]]:
    """Specs of every registry-built layer inside `module`, by submodule path."""
    specs = {}
    for path, sub in module.named_modules():
        spec = layer_spec(sub) if path else None
        if spec is not None:
            specs[path] = spec
    return specs


def restore_layers(module: nn.Module, specs: dict[str, dict[str, Any]]) -> list[str]:
    """Rebuild the submodules whose saved spec differs from the current one; returns their paths.

    Call it before `load_state_dict` (e.g. in `on_load_checkpoint`), so a checkpoint written after
    an STU -> LDS swap or a pruning loads into the architecture it was saved from.
    """
    rebuilt = []
    for path, spec in specs.items():
        parent_path, _, attr = path.rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        current = getattr(parent, attr, None)
        if current is None or layer_spec(current) != spec:
            kwargs = dict(spec)
            setattr(parent, attr, build_layer(kwargs.pop("name"), **kwargs))
            rebuilt.append(path)
    return rebuilt


class SequenceLayer(nn.Module):
    """Base of every mixer: a full-sequence forward plus one incremental decoding protocol.

    Decoding: `state = layer.init_state(batch, device, dtype)`, or `y, state = layer.prefill(x)` for a
    prompt, then `y_t, state = layer.step(x_t, state)` one token at a time (x_t: (batch, dim));
    `layer.prefill(chunk, state=state)` continues a prompt chunk by chunk from any such state. A state
    is whatever the layer needs (a tensor, a cache); `forward` never builds one. Two more methods let
    `spectralds.generate` batch and graph any layer without knowing its state: `merge_states` (prompts
    prefilled apart -> one batched state) and `static_state` (fixed shapes for a CUDA graph).

    Left padding: `forward(x, start)` and `prefill(x, start)` take `start`, None or a (batch,) long
    tensor, the index of each row's first real token. The caller zeroes x before start[b] (`padding_mask`),
    so a layer that is time-invariant from a zero state (convolutions, LDS, AR terms) ignores it; a layer
    that is not (attention) must keep its real positions equal to each row's unpadded run.

    A layer with several exact decoding algorithms lists them in `decode_methods` (a subset of
    DECODE_METHODS) and uses `decode_method`; `set_decode_method` changes it. Layers with one way to
    decode leave both empty.
    """

    decode_methods: tuple[str, ...] = ()
    decode_method: str | None = None
    # The `build_layer` name and arguments this layer was made from (None: built directly). Saved in
    # checkpoints (`layer_specs`) so a swapped or pruned architecture is rebuilt before its weights load.
    build_spec: dict[str, Any] | None = None

    def set_decode_method(self, method: str) -> None:
        if not self.decode_methods:
            raise UserError(f"{type(self).__name__} decodes one way: it has no decode method to choose")
        check_choice("decode method", method, self.decode_methods)
        self.decode_method = method

    def forward(self, x: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:  # (B, T, D)
        raise NotImplementedError

    def forward_flops(self, batch: int, seq_len: int) -> float | None:
        """Forward FLOPs of `forward` on a (batch, seq_len) input along the path it takes, covering the
        layer's own parameters (not its submodules': telemetry counts those), or None: not known, and
        telemetry counts 2 FLOPs per token per weight element (`models.telemetry.forward_flops`)."""
        return None

    def init_state(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> Any:
        raise NotImplementedError

    def step(self, x_t: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def prefill(
        self, x: torch.Tensor, start: torch.Tensor | None = None, state: Any = None, keep_state: bool = True
    ) -> tuple[torch.Tensor, Any]:
        """Run a prompt and return its outputs and the state after it.

        state: None (a first prefill, from the zero state), or a state of this layer from an earlier
        `prefill` or `step` (same batch): x is then a chunk following what that state has seen, and the
        outputs and the state returned are those of one prefill over prefix + chunk (the same later
        `step` outputs; the state also merges, `merge_states`). `start` (left padding) is for a first
        prefill only (`check_continuation`). The package's layers leave the given state unchanged (one
        context state can serve several continuations); this default's steps may write it, as `step` does.
        keep_state=False: only the outputs are wanted (scoring a continuation): a layer may return None as
        the state and skip building it (an STU's FutureFill then reads the chunk's positions of its
        `future` buffer and adds the chunk's own convolution; an LDS adds only its state's response; an
        attention layer builds no cache); the outputs are those of keep_state=True, to rounding. A layer
        whose `continues_repeated()` is True then also takes a chunk of n times the state's batch, row r
        continuing the state's row r % batch (n continuations of each context without copying its state).

        This default steps token by token from the state (correct for any layer; from the zero state for
        a layer time-invariant from it, the padded inputs being zeros); layers override it with a fast
        path. It knows no state's batch: a mismatched one fails in the layer's `step`.
        """
        check_continuation(start, state, x.shape[0], None)
        if state is None:
            state = self.init_state(x.shape[0], device=x.device, dtype=x.dtype)
        ys = []
        for t in range(x.shape[1]):
            y_t, state = self.step(x[:, t], state)
            ys.append(y_t)
        return torch.stack(ys, dim=1), state

    def continues_repeated(self) -> bool:
        """Whether `prefill(x, state=s, keep_state=False)` takes x of a multiple of s's batch (above)."""
        return False

    def merge_states(self, states: list[Any]) -> Any:
        """States of prompts prefilled apart (each fresh from `prefill`, any batch) -> one state for their
        concatenated batch, every prompt right-aligned at the longest as if preceded by zero inputs."""
        raise UserError(f"{type(self).__name__} cannot merge the states of separately prefilled prompts "
                        "(it defines no merge_states)")

    def static_state(self, state: Any) -> Any:
        """`state` with fixed shapes that a step updates in place, for a step recorded as a CUDA graph;
        a one-line UserError naming the reason where the state cannot have them."""
        raise UserError(f"{type(self).__name__}'s decoding state grows with the position (it defines no "
                        "static_state), and a recorded graph replays fixed shapes")


def check_start(start: torch.Tensor | None, batch: int, length: int) -> None:
    """`start` is None or (batch,) integers in [0, length): every row keeps at least one real token."""
    if start is None:
        return
    integer = isinstance(start, torch.Tensor) and start.dtype in (torch.int64, torch.int32, torch.int16)
    if not integer or start.shape != (batch,):
        got = f"{tuple(start.shape)} {start.dtype}" if torch.is_tensor(start) else type(start).__name__
        raise UserError(f"start must be a ({batch},) integer tensor (each row's first real token), "
                        f"got {got}")
    if batch and (start.min() < 0 or start.max() >= length):
        raise UserError(f"start must lie in [0, {length}) so every row keeps a real token, "
                        f"got {start.tolist()}")


def check_continuation(
    start: torch.Tensor | None, state: Any, batch: int, state_batch: int | None, repeats: bool = False
) -> None:
    """A prefill continuing from `state` (not None) takes no `start`, and a state of the chunk's batch
    (`state_batch`: the sequences the state holds, None: not known to the caller); repeats: or a batch
    that is a multiple of it (`SequenceLayer.continues_repeated`)."""
    if state is None:
        return
    if start is not None:
        raise UserError("start (left padding) is for a first prefill only: a prefill continuing from a "
                        "state takes start=None")
    if repeats and state_batch is not None and batch % state_batch == 0:
        return
    if state_batch is not None and state_batch != batch:
        raise UserError(f"the decoding state holds {state_batch} sequences but the chunk continuing it has "
                        f"{batch}")


def add_repeated(y: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """y (n * B, ...) plus part (B, ...) added to each of its n blocks of B rows (row r gets r % B)."""
    return (y.unflatten(0, (-1, part.shape[0])) + part).flatten(0, 1)


def padding_mask(start: torch.Tensor, length: int) -> torch.Tensor:
    """(batch, length) boolean, True at the padded positions t < start[b]."""
    return torch.arange(length, device=start.device) < start[:, None]
