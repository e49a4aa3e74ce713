"""Autoregressive generation over any `DecodingModel` (STU, attention, LDS alike).

It knows no concrete layer: batching prompts of different lengths (one left-padded prefill, or
`merge_prefills`) and fixed-shape states for CUDA graphs (`static_states`) go through the
`SequenceLayer` protocol of each of the model's `decoding_layers()`.

`decode_loop` is the one loop that drives `step`; `generate` samples through it, and the decode timings
(`spectralds.callbacks.report`, tools/bench_decode.py) time it.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from spectralds.errors import UserError, check_int
from spectralds.layers.registry import DECODE_METHODS, SequenceLayer


@runtime_checkable
class DecodingModel(Protocol):
    """What `generate` decodes: token ids in, logits out (LanguageModel, or a wrapper delegating to one).

    `prefill(idx, start=None)` -> (logits of the last position, states) takes `start` for left-padded
    prompts (see `SequenceLayer`) and, for a prompt prefilled in chunks (`prefill_chunk`), `states`: those
    of the chunks before (`LanguageModel.prefill`); `step(token, states)` -> (logits, states);
    `decoding_layers()` lists the SequenceLayer behind each state, in the order of the states (what
    batches and graphs them).
    """

    seq_len: int

    def prefill(self, idx: torch.Tensor, start: torch.Tensor | None = None) -> tuple[torch.Tensor, list]: ...

    def step(self, token: torch.Tensor, states: list) -> tuple[torch.Tensor, list]: ...

    def decoding_layers(self) -> list[SequenceLayer]: ...


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, generator=None) -> torch.Tensor:
    """Greedy when temperature == 0, else softmax sampling at `temperature` over the top_k logits."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature  # as Hugging Face samples (the export tests compare draws)
    # Where a tiny temperature overflowed, or a huge one (inf as a float32 scalar) made a masked -inf NaN:
    # the same distribution from the max-shifted logits in float64, which stay <= 0 (no host sync).
    shifted = logits.double() - logits.double().amax(dim=-1, keepdim=True)
    broken = ((scaled == math.inf) | scaled.isnan()).any(dim=-1, keepdim=True)
    logits = torch.where(broken, (shifted / temperature).float(), scaled)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _layers(model) -> list[SequenceLayer]:
    """The SequenceLayer behind each decoding state: the model's `decoding_layers()`, or a bare layer."""
    if isinstance(model, SequenceLayer):
        return [model]
    if not isinstance(model, DecodingModel):
        raise UserError(f"{type(model).__name__} does not list its decoding layers (decoding_layers()), "
                        "so its states cannot be batched or graphed")
    return list(model.decoding_layers())


def _per_layer(model, states) -> tuple[list[SequenceLayer], list[Any]]:
    """The layers and their states, aligned (a bare layer's one state is not a list)."""
    layers = _layers(model)
    states = [states] if isinstance(model, SequenceLayer) else list(states)
    if len(layers) != len(states):
        raise UserError(f"{type(model).__name__}.decoding_layers() lists {len(layers)} layers but its "
                        f"decoding has {len(states)} states")
    return layers, states


def static_states(model, states):
    """`states` with every layer's state in fixed shapes (`SequenceLayer.static_state`: an LDS tensor, a
    window's `RingKVCache`), for a step recorded as a CUDA graph; a clear error naming the layer that
    cannot have one."""
    layers, per_layer = _per_layer(model, states)
    try:
        converted = [layer.static_state(state) for layer, state in zip(layers, per_layer, strict=True)]
    except UserError as err:
        raise UserError(f"CUDA-graph decoding needs fixed-size states: {err}") from err
    return converted[0] if isinstance(model, SequenceLayer) else converted


def _leaves(states) -> list[torch.Tensor]:
    """Every tensor of a (nested) state, in a fixed order."""
    if isinstance(states, torch.Tensor):
        return [states]
    if dataclasses.is_dataclass(states):  # e.g. ARDecodeState
        return [leaf for f in dataclasses.fields(states) for leaf in _leaves(getattr(states, f.name))]
    return [leaf for item in states for leaf in _leaves(item)] if isinstance(states, (list, tuple)) else []


def _clone(states):
    if isinstance(states, torch.Tensor):
        return states.clone()
    if dataclasses.is_dataclass(states):
        return dataclasses.replace(states, **{f.name: _clone(getattr(states, f.name))
                                              for f in dataclasses.fields(states)})
    if isinstance(states, tuple) and type(states) is not tuple:  # a NamedTuple cache
        return type(states)(*(_clone(s) for s in states))
    return type(states)(_clone(s) for s in states) if isinstance(states, (list, tuple)) else states


def graphable(model, states) -> bool:
    """True when every state of `model` has (or converts to) fixed shapes: LDS and windowed attention."""
    try:
        static_states(model, states)
    except UserError:
        return False
    return True


class GraphedStep:
    """`model.step` recorded once as a CUDA graph and replayed for every token.

    A decode step of a small model is a few dozen tiny kernels, so on a GPU its time is launch overhead;
    one graph replay launches them all at once. Only for fixed-size states: the LDS's (batch, channels,
    h) tensor (with its AR history, if any) and a window's ring buffer with its position as a tensor
    (`static_states`); an STU or full attention cache grows with the position, which a recorded graph
    cannot follow. States are updated in place: call it as `logits, states = graphed(token, states)`.
    """

    def __init__(self, model, token: torch.Tensor, states) -> None:
        if token.device.type != "cuda":
            raise UserError("CUDA graphs need the model and its inputs on a CUDA device")
        self.model = model
        self.token = token.clone()
        self.states = _clone(static_states(model, states))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (allocations, cached step tables) off the graph
            for _ in range(2):  # on copies: a step writes its caches in place
                model.step(self.token, _clone(self.states))
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits, new_states = model.step(self.token, self.states)
            for old, new in zip(_leaves(self.states), _leaves(new_states), strict=True):
                if new is not old:  # a cache written in place is already there
                    old.copy_(new)

    def __call__(self, token: torch.Tensor, states) -> tuple[torch.Tensor, list]:
        self.token.copy_(token)
        if states is not self.states:
            given = _leaves(static_states(self.model, states))
            for old, new in zip(_leaves(self.states), given, strict=True):
                old.copy_(new)
        self.graph.replay()
        return self.logits, self.states


StepFn = Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]


def decode_loop(
    step: StepFn, out: torch.Tensor | None, state: Any, steps: int, choose: Callable[[int, Any], torch.Tensor]
) -> tuple[torch.Tensor | None, Any]:
    """The decoding loop (the only one: `generate`, StageReport and tools/bench_decode.py run it).

    `steps` times: x = choose(i, out), then out, state = step(x, state). `out` starts as the prefill's
    output; `choose` samples the next token from it, or feeds given inputs (benchmarks ignore `out`).
    Returns the last output and state.
    """
    for i in range(steps):
        out, state = step(choose(i, out), state)
    return out, state


def graphed_step(model) -> StepFn:
    """`model.step`, recorded as a CUDA graph at its first call (`GraphedStep`) and replayed after."""
    graphed = None

    def step(token: torch.Tensor, states):
        nonlocal graphed
        graphed = graphed or GraphedStep(model, token, states)
        logits, states = graphed(token, states)
        return logits.clone(), states  # the graph overwrites its output buffer on the next replay

    return step


def merge_prefills(model, per_prefill: list[Any]) -> Any:
    """The states of several prefills (each a list of per-layer states, or a bare layer's state) -> one
    batched state, every prompt right-aligned at the longest (`SequenceLayer.merge_states`)."""
    if isinstance(model, SequenceLayer):
        return model.merge_states(list(per_prefill))
    layers = _layers(model)
    columns = zip(*(_per_layer(model, states)[1] for states in per_prefill), strict=True)
    return [layer.merge_states(list(states)) for layer, states in zip(layers, columns, strict=True)]


def left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """1-D prompts -> (batch, longest) ids, each right-aligned after zeros, and `start` (each row's first
    real token; None when all have one length)."""
    lengths = torch.tensor([p.numel() for p in prompts])
    idx = torch.zeros(len(prompts), int(lengths.max()), dtype=prompts[0].dtype, device=prompts[0].device)
    for row, prompt in zip(idx, prompts, strict=True):
        row[len(row) - prompt.numel() :] = prompt
    start = lengths.max() - lengths
    return idx, (start.to(idx.device) if start.any() else None)


def _takes(model, argument: str, why: str) -> None:
    if argument not in inspect.signature(model.prefill).parameters:
        raise UserError(f"{type(model).__name__}.prefill(idx) takes no `{argument}` ({why})")


def chunked_prefill(model, idx: torch.Tensor, prefill_chunk: int | None = None) -> tuple[torch.Tensor, Any]:
    """`model.prefill(idx)`, `prefill_chunk` tokens at a time (None: at once): each chunk continues from
    the states the ones before left (`DecodingModel.prefill`'s `states`), so the logits and states are
    one prefill's while the activations are at most a chunk's."""
    if prefill_chunk is None or idx.shape[1] <= check_int("prefill_chunk", prefill_chunk):
        return model.prefill(idx)
    _takes(model, "states", "continuing from earlier states), so it cannot prefill in chunks: "
                            "leave prefill_chunk None")
    logits, states = model.prefill(idx[:, :prefill_chunk])
    for begin in range(prefill_chunk, idx.shape[1], prefill_chunk):
        logits, states = model.prefill(idx[:, begin : begin + prefill_chunk], states=states)
    return logits, states


def prefill_prompts(
    model, prompts: list[torch.Tensor], prefill_chunk: int | None = None
) -> tuple[torch.Tensor, list[Any]]:
    """Prefill prompts of any lengths as one left-padded batch (`DecodingModel.prefill`'s `start`): each
    row's logits and state are those of its prompt alone, and every layer then steps all together.

    prefill_chunk: prompts longer than it are prefilled that many tokens at a time (`chunked_prefill`);
    prompts of different lengths then each alone, their states merged (`merge_prefills`)."""
    idx, start = left_pad(prompts)
    if prefill_chunk is not None and idx.shape[1] > check_int("prefill_chunk", prefill_chunk):
        if start is None:
            return chunked_prefill(model, idx, prefill_chunk)
        alone = [chunked_prefill(model, p[None], prefill_chunk) for p in prompts]
        return torch.cat([logits for logits, _ in alone]), merge_prefills(model, [s for _, s in alone])
    if start is None:
        return model.prefill(idx)
    _takes(model, "start", "left padding), so it cannot prefill prompts of different lengths as one batch: "
                           "give prompts of one length")
    return model.prefill(idx, start=start)


@torch.inference_mode()
def generate(
    model,
    prompt: torch.Tensor | Sequence[torch.Tensor],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    cuda_graph: bool | None = None,
    prefill_chunk: int | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """prompt (B, T) token ids -> (B, T + max_new_tokens). The prompt is run once (prefill).

    vocab_size: sample only ids below it, the ids a tokenizer can decode (a model's vocabulary may be
    padded past its tokenizer's); None: every id of the logits.

    prompt may also be a list of 1-D prompts of different lengths -> a list of 1-D tensors, each its
    prompt + max_new_tokens tokens; they decode as one batch, greedy tokens as if each ran alone.
    cuda_graph: replay each step from a CUDA graph (`GraphedStep`); None = when the model is on a GPU
    and its states are fixed-size (LDS, sliding-window attention); True where that is impossible is
    an error.
    prefill_chunk: prefill prompts longer than this many tokens chunk by chunk (`chunked_prefill`), so the
    prefill's memory is bounded by the chunk; the tokens are those of one prefill (None: at once).
    """
    ragged = not isinstance(prompt, torch.Tensor)
    prompts = list(prompt) if ragged else []
    if ragged and (not prompts or any(p.ndim != 1 or p.numel() == 0 for p in prompts)):
        raise UserError("prompts must be a non-empty list of non-empty 1-D token tensors")
    if not ragged and (prompt.ndim != 2 or prompt.shape[1] == 0):
        raise UserError("the prompt must be a non-empty (batch, tokens) tensor")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0, got {temperature}")
    if prefill_chunk is not None:
        check_int("prefill_chunk", prefill_chunk)
    if vocab_size is not None and vocab_size < 1:
        raise UserError(f"vocab_size must be >= 1, got {vocab_size}")
    longest = max(p.numel() for p in prompts) if ragged else prompt.shape[1]
    if longest + max_new_tokens > model.seq_len:
        raise UserError(
            f"prompt ({longest} tokens) + {max_new_tokens} new tokens exceeds the model's "
            f"context of {model.seq_len} tokens"
        )
    if ragged:
        logits, states = prefill_prompts(model, prompts, prefill_chunk)
    else:
        logits, states = chunked_prefill(model, prompt, prefill_chunk)
    device = logits.device
    if cuda_graph is None:
        cuda_graph = device.type == "cuda" and max_new_tokens > 2 and graphable(model, states)
    new: list[torch.Tensor] = []

    def choose(i: int, logits: torch.Tensor) -> torch.Tensor:
        if vocab_size is not None and logits.shape[-1] > vocab_size:
            logits = logits.clone()  # not the model's own output
            logits[..., vocab_size:] = float("-inf")
        token = sample_next(logits, temperature, top_k, generator)
        new.append(token[:, None])
        return token

    step = graphed_step(model) if cuda_graph else model.step
    # Every new token but the last is fed back through a step; the last one only needs sampling.
    logits, _ = decode_loop(step, logits, states, max(0, max_new_tokens - 1), choose)
    if max_new_tokens > 0:
        choose(max_new_tokens - 1, logits)
    if not new:
        new.append(torch.zeros(len(logits), 0, dtype=torch.long, device=device))
    new_tokens = torch.cat(new, dim=1)
    if ragged:
        return [torch.cat([p, t.to(p.device)]) for p, t in zip(prompts, new_tokens, strict=True)]
    return torch.cat([prompt, new_tokens.to(prompt.device)], dim=1)


def set_decode_method(model: torch.nn.Module, method: str) -> int:
    """Choose how every layer offering several decoding algorithms (STU, STU-T) decodes; returns how many."""
    if method not in DECODE_METHODS:
        raise UserError(f"unknown decode method {method!r}; expected one of {DECODE_METHODS}")
    layers = [m for m in model.modules() if isinstance(m, SequenceLayer) and method in m.decode_methods]
    for layer in layers:
        layer.set_decode_method(method)
    return len(layers)
