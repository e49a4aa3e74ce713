"""Autoregressive generation over any model with `prefill` / `step` (STU, attention, LDS alike).

`decode_loop` is the one loop that drives `step`; `generate` samples through it, and the decode timings
(`spectralds.callbacks.report`, tools/bench_decode.py) time it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from spectralds.errors import UserError
from spectralds.layers import futurefill
from spectralds.layers.ar import ARDecodeState
from spectralds.layers.attention import KVCache, merge_caches
from spectralds.layers.futurefill import ConvDecodeState
from spectralds.layers.registry import DECODE_METHODS, SequenceLayer


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, generator=None) -> torch.Tensor:
    """Greedy when temperature == 0, else softmax sampling at `temperature` over the top_k logits."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _mixers(model) -> list:
    """The sequence layer behind each decoding state: a LanguageModel's mixers, or the model itself."""
    blocks = getattr(model, "blocks", None)
    return [block.mixer for block in blocks] if blocks is not None else [model]


def static_states(model, states):
    """`states` with every layer's state in fixed shapes (an LDS tensor, a window's `RingKVCache`), for
    a step recorded as a CUDA graph; a clear error naming the layer that cannot have one."""
    single = not isinstance(states, list)
    converted = []
    for mixer, state in zip(_mixers(model), [states] if single else states, strict=True):
        if not isinstance(state, torch.Tensor):
            if not hasattr(mixer, "static_state"):
                raise UserError(
                    f"CUDA-graph decoding needs fixed-size states (LDS layers, sliding-window attention); "
                    f"{type(mixer).__name__}'s cache grows with the position and its update (a sum over "
                    "the history, FutureFill's dyadic schedule) changes shape every token"
                )
            try:
                state = mixer.static_state(state)
            except UserError as err:
                raise UserError(f"CUDA-graph decoding needs fixed-size states: {err}") from err
        converted.append(state)
    return converted[0] if single else converted


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
    if isinstance(states, tuple) and hasattr(states, "_fields"):  # a NamedTuple cache
        return type(states)(*(_clone(s) for s in states))
    return type(states)(_clone(s) for s in states)


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


def merge_states(per_prompt: list[list[Any]], model) -> list[Any]:
    """Per-block states of prompts prefilled one by one -> one batched state per block, the prompts
    right-aligned at the longest (see `merge_caches`, `futurefill.merge_states`)."""
    return [_merge(mixer, list(states))
            for mixer, states in zip(_mixers(model), zip(*per_prompt, strict=True), strict=True)]


def _merge(mixer, states: list[Any]) -> Any:
    first = states[0]
    if isinstance(first, torch.Tensor):  # an LDS state: the same at any position, zeros before
        return torch.cat(states)
    if isinstance(first, KVCache):
        return merge_caches(states, mixer.window_size)
    if isinstance(first, ConvDecodeState):
        return futurefill.merge_states(states)
    if isinstance(first, ARDecodeState):  # each history holds its own prompt's last steps, zeros before
        inner = _merge(mixer, [s.inner for s in states])
        inputs, outputs = (torch.cat([getattr(s, name) for s in states]) for name in ("inputs", "outputs"))
        return ARDecodeState(inner, inputs, outputs)
    raise UserError(f"{type(mixer).__name__} cannot decode prompts of different lengths in one batch")


def prefill_prompts(model, prompts: list[torch.Tensor]) -> tuple[torch.Tensor, list[Any]]:
    """Prefill prompts of any lengths as one batch: one prefill when they share a length, else each
    alone (exactly its own prefill) and the states merged, every layer then stepping all together."""
    if len({p.numel() for p in prompts}) == 1:
        return model.prefill(torch.stack(prompts))
    prefills = [model.prefill(p[None]) for p in prompts]
    return torch.cat([logits for logits, _ in prefills]), merge_states([s for _, s in prefills], model)


@torch.inference_mode()
def generate(
    model,
    prompt: torch.Tensor | Sequence[torch.Tensor],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    cuda_graph: bool | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """prompt (B, T) token ids -> (B, T + max_new_tokens). The prompt is run once (prefill).

    prompt may also be a list of 1-D prompts of different lengths -> a list of 1-D tensors, each its
    prompt + max_new_tokens tokens; they decode as one batch, greedy tokens as if each ran alone.
    cuda_graph: replay each step from a CUDA graph (`GraphedStep`); None = when the model is on a GPU
    and its states are fixed-size (LDS, sliding-window attention); True where that is impossible is
    an error.
    """
    ragged = not isinstance(prompt, torch.Tensor)
    prompts = list(prompt) if ragged else []
    if ragged and (not prompts or any(p.ndim != 1 or p.numel() == 0 for p in prompts)):
        raise UserError("prompts must be a non-empty list of non-empty 1-D token tensors")
    if not ragged and (prompt.ndim != 2 or prompt.shape[1] == 0):
        raise UserError("the prompt must be a non-empty (batch, tokens) tensor")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0, got {temperature}")
    longest = max(p.numel() for p in prompts) if ragged else prompt.shape[1]
    if longest + max_new_tokens > model.seq_len:
        raise UserError(
            f"prompt ({longest} tokens) + {max_new_tokens} new tokens exceeds the model's "
            f"context of {model.seq_len} tokens"
        )
    logits, states = prefill_prompts(model, prompts) if ragged else model.prefill(prompt)
    device = logits.device
    if cuda_graph is None:
        cuda_graph = device.type == "cuda" and max_new_tokens > 2 and graphable(model, states)
    new: list[torch.Tensor] = []

    def choose(i: int, logits: torch.Tensor) -> torch.Tensor:
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
