"""Pieces shared by the LightningModules: optimizer defaults, mixer construction, checkpoints."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from torch import nn

from spectralds.errors import NonFiniteError, UserError
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
        raise UserError("layer_pattern must name at least one layer, e.g. ['stu'] or ['stu', 'attn']")
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
    checkpoint["spectralds_model"] = type(module).__name__


def load_layer_specs(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Rebuild swapped/pruned layers so the checkpoint's weights fit the architecture they came from."""
    restore_layers(module, checkpoint.get("spectralds_layers", {}))


NONFINITE_POLICIES = ("stop", "skip")


def check_nonfinite_policy(policy: str) -> None:
    if policy not in NONFINITE_POLICIES:
        raise UserError(f"nonfinite_loss must be one of {NONFINITE_POLICIES}, got {policy!r}")


def guard_loss(module: L.LightningModule, loss: torch.Tensor, policy: str) -> torch.Tensor | None:
    """Non-finite loss: "stop" raises naming the step, "skip" drops the step (returns None).

    The ranks agree first, so under DDP they all skip or all stop together.
    """
    finite = bool(torch.isfinite(loss))
    if module._trainer is not None:
        finite = module.trainer.strategy.reduce_boolean_decision(finite, all=True)
    if finite:
        return loss
    if policy == "skip":
        return None
    raise NonFiniteError(
        f"non-finite training loss ({loss.item()}) at global step {module.global_step}; stopping "
        "(set the model's nonfinite_loss: skip to skip such steps instead)"
    )


class SpectralModule(L.LightningModule):
    """What every spectralds model shares: optimizers built from injected callables (so swapped
    layers get fresh ones), throughput and learning-rate logging, and checkpoints that remember
    swapped/pruned layers."""

    optimizer_factory: Any
    scheduler_factory: Any
    _step_start: float | None = None

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self._step_start is None:
            return
        elapsed = max(time.perf_counter() - self._step_start, 1e-9)
        tokens = batch[0].shape[0] * batch[0].shape[1] * self.trainer.world_size
        self.log("train/tokens_per_sec", tokens / elapsed)
        if self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_layer_specs(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        load_layer_specs(self, checkpoint)
