"""What StageReport measures about the model in hand: whether validation already saw these exact
weights, its layers and LDS states, and its decode speed. Reporting (tables, files) is `stage_table`."""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import Any

import torch

from spectralds.generate import decode_loop
from spectralds.layers import SequenceLayer, layer_specs
from spectralds.layers.lds import LDS


def model_row(label: str, module: torch.nn.Module) -> dict[str, Any]:
    """The row's fields that describe the architecture: layer kinds, LDS states, how STU layers decode."""
    lds = [m.state_dim for m in module.modules() if isinstance(m, LDS)]
    layers = [m for m in module.modules() if isinstance(m, SequenceLayer)]
    decode = [m.decode_method for m in layers if m.decode_methods]  # STU layers: how they decode
    return {
        "model": label,
        "layers": layer_summary(module),
        "lds_states": sum(lds) if lds else None,
        "lds_states_per_layer": lds,
        "decode": sorted(set(decode)),
    }


@torch.inference_mode()
def decode_ms_per_token(
    model: torch.nn.Module, vocab_size: int, prompt_len: int, tokens: int, repeats: int = 3
) -> float:
    """Milliseconds per greedy `model.step` (batch 1) after `prefill` of a random prompt; best of repeats."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(vocab_size, (1, prompt_len), generator=gen).to(device)
    best = math.inf
    for run in range(repeats + 1):  # run 0 warms up (allocations, cached decoding tables)
        logits, states = model.prefill(prompt)
        _sync(device)
        start = time.perf_counter()
        decode_loop(model.step, logits, states, tokens, lambda i, logits: logits.argmax(dim=-1))
        _sync(device)
        if run:
            best = min(best, time.perf_counter() - start)
    return best / tokens * 1e3


def fingerprint(module: torch.nn.Module) -> tuple:
    """Changes whenever a weight is replaced, reshaped or modified in place (optimizer steps, swaps)."""
    return tuple(
        (name, tuple(t.shape), t.data_ptr(), t._version)
        for name, t in module.state_dict(keep_vars=True).items()
    )


def layer_summary(module: torch.nn.Module) -> str:
    counts = Counter(spec["name"] for spec in layer_specs(module).values())
    return " + ".join(f"{n} {name}" for name, n in counts.items()) or type(module).__name__


def vocab_size(module: torch.nn.Module) -> int | None:
    vocab = getattr(module, "hparams", {}).get("vocab_size")
    embed = getattr(module, "embed", None)
    return vocab or getattr(embed, "num_embeddings", None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
