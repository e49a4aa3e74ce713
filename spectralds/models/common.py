"""Pieces shared by the LightningModules: optimizer defaults, mixer construction, checkpoints."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from spectralds.layers import build_layer, layer_specs, restore_layers

SPECTRAL_LAYERS = ("stu", "stu_t", "lds")  # layers that take seq_len and num_filters


def default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)


def build_mixers(
    num_layers: int,
    layer_pattern: list[str],
    dim: int,
    seq_len: int,
    num_filters: int,
    layer_kwargs: dict[str, dict[str, Any]] | None,
) -> list[nn.Module]:
    """Layer i gets `layer_pattern[i % len(layer_pattern)]`; kwargs per layer name from `layer_kwargs`."""
    if not layer_pattern:
        raise ValueError("layer_pattern must name at least one layer, e.g. ['stu'] or ['stu', 'attn']")
    layer_kwargs = layer_kwargs or {}
    mixers = []
    for i in range(num_layers):
        name = layer_pattern[i % len(layer_pattern)]
        kwargs: dict[str, Any] = {"dim": dim, "seq_len": seq_len}
        if name in SPECTRAL_LAYERS:
            kwargs["num_filters"] = num_filters
        kwargs.update(layer_kwargs.get(name, {}))
        mixers.append(build_layer(name, **kwargs))
    return mixers


def save_layer_specs(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    checkpoint["spectralds_layers"] = layer_specs(module)


def load_layer_specs(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Rebuild swapped/pruned layers so the checkpoint's weights fit the architecture they came from."""
    restore_layers(module, checkpoint.get("spectralds_layers", {}))


def guard_loss(loss: torch.Tensor, step: int, policy: str) -> torch.Tensor | None:
    """Non-finite loss: "stop" raises naming the step, "skip" drops the step (returns None)."""
    if torch.isfinite(loss):
        return loss
    if policy == "skip":
        return None
    raise FloatingPointError(f"non-finite training loss ({loss.item()}) at global step {step}; stopping")
