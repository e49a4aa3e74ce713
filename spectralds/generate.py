"""Autoregressive generation over any model with `prefill` / `step` (STU, attention, LDS alike)."""

from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, generator=None) -> torch.Tensor:
    """Greedy when temperature == 0, else softmax sampling at `temperature` over the top_k logits."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """prompt (B, T) token ids -> (B, T + max_new_tokens). The prompt is run once (prefill)."""
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError("the prompt must be a non-empty (batch, tokens) tensor")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    total = prompt.shape[1] + max_new_tokens
    if total > model.seq_len:
        raise ValueError(
            f"prompt ({prompt.shape[1]} tokens) + {max_new_tokens} new tokens exceeds the model's "
            f"context of {model.seq_len} tokens"
        )
    logits, states = model.prefill(prompt)
    out = [prompt]
    for i in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, generator)
        out.append(token[:, None])
        if i + 1 < max_new_tokens:
            logits, states = model.step(token, states)
    return torch.cat(out, dim=1)


def set_decode_method(model: torch.nn.Module, method: str) -> int:
    """Choose how every STU layer in `model` decodes ("futurefill" or "naive"); returns how many."""
    if method not in ("futurefill", "naive"):
        raise ValueError(f"unknown decode method {method!r}; expected 'futurefill' or 'naive'")
    count = 0
    for module in model.modules():
        if hasattr(module, "decode") and isinstance(module.decode, str):
            module.decode = method
            count += 1
    return count
