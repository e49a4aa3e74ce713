"""Autoregressive generation over any model with `prefill` / `step` (STU, attention, LDS alike)."""

from __future__ import annotations

import torch

from spectralds.errors import UserError


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
    graphed = None
    out = [prompt]
    for i in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, generator)
        out.append(token[:, None])
        if i + 1 < max_new_tokens:
            if cuda_graph:
                graphed = graphed or GraphedStep(model, token, states)
                logits, states = graphed(token, states)
                logits = logits.clone()  # the graph overwrites its output buffer on the next replay
            else:
                logits, states = model.step(token, states)
    return torch.cat(out, dim=1)


def set_decode_method(model: torch.nn.Module, method: str) -> int:
    """Choose how every STU layer in `model` decodes ("futurefill" or "naive"); returns how many."""
    if method not in ("futurefill", "naive"):
        raise UserError(f"unknown decode method {method!r}; expected 'futurefill' or 'naive'")
    count = 0
    for module in model.modules():
        if hasattr(module, "decode") and isinstance(module.decode, str):
            module.decode = method
            count += 1
    return count
