"""Autoregressive generation over any model with `prefill` / `step` (STU, attention, LDS alike).

`decode_loop` is the one loop that drives `step`; `generate` samples through it, and the decode timings
(`spectralds.callbacks.report`, tools/bench_decode.py) time it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from spectralds.errors import UserError
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


def fixed_size_states(states) -> bool:
    """True when every decoding state is one plain tensor (LDS layers): their shapes never change."""
    states = states if isinstance(states, (list, tuple)) else [states]
    return all(isinstance(s, torch.Tensor) for s in states)


class GraphedStep:
    """`model.step` recorded once as a CUDA graph and replayed for every token.

    A decode step of a small model is a few dozen tiny kernels, so on a GPU its time is launch overhead;
    one graph replay launches them all at once. Only for fixed-size states (the LDS's (batch, channels,
    h) tensor): an STU or attention cache grows with the position, which a recorded graph cannot follow.
    The state is updated in place: call it as `logits, states = graphed(token, states)`.
    """

    def __init__(self, model, token: torch.Tensor, states) -> None:
        if token.device.type != "cuda":
            raise UserError("CUDA graphs need the model and its inputs on a CUDA device")
        if not fixed_size_states(states):
            raise UserError("CUDA-graph decoding needs fixed-size states (LDS layers only); this model "
                             "has STU or attention layers whose caches grow with the position")
        self.token = token.clone()
        self.states = [s.clone() for s in states]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (allocations, cached step tables) off the graph
            for _ in range(2):
                model.step(self.token, self.states)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits, new_states = model.step(self.token, self.states)
            for old, new in zip(self.states, new_states, strict=True):
                old.copy_(new)

    def __call__(self, token: torch.Tensor, states) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self.token.copy_(token)
        if states is not self.states:
            for old, new in zip(self.states, states, strict=True):
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


@torch.inference_mode()
def generate(
    model,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    cuda_graph: bool | None = None,
) -> torch.Tensor:
    """prompt (B, T) token ids -> (B, T + max_new_tokens). The prompt is run once (prefill).

    cuda_graph: replay each step from a CUDA graph (`GraphedStep`); None = when the model is on a GPU
    and its states are fixed-size (LDS); True where that is impossible is an error.
    """
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise UserError("the prompt must be a non-empty (batch, tokens) tensor")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0, got {temperature}")
    total = prompt.shape[1] + max_new_tokens
    if total > model.seq_len:
        raise UserError(
            f"prompt ({prompt.shape[1]} tokens) + {max_new_tokens} new tokens exceeds the model's "
            f"context of {model.seq_len} tokens"
        )
    logits, states = model.prefill(prompt)
    if cuda_graph is None:
        cuda_graph = prompt.device.type == "cuda" and fixed_size_states(states) and max_new_tokens > 2
    out = [prompt]

    def choose(i: int, logits: torch.Tensor) -> torch.Tensor:
        token = sample_next(logits, temperature, top_k, generator)
        out.append(token[:, None])
        return token

    step = graphed_step(model) if cuda_graph else model.step
    # Every new token but the last is fed back through a step; the last one only needs sampling.
    logits, _ = decode_loop(step, logits, states, max(0, max_new_tokens - 1), choose)
    if max_new_tokens > 0:
        choose(max_new_tokens - 1, logits)
    return torch.cat(out, dim=1)


def set_decode_method(model: torch.nn.Module, method: str) -> int:
    """Choose how every layer offering several decoding algorithms (STU, STU-T) decodes; returns how many."""
    if method not in DECODE_METHODS:
        raise UserError(f"unknown decode method {method!r}; expected one of {DECODE_METHODS}")
    layers = [m for m in model.modules() if isinstance(m, SequenceLayer) and method in m.decode_methods]
    for layer in layers:
        layer.set_decode_method(method)
    return len(layers)
