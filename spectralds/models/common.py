"""Pieces shared by the LightningModules: optimizer defaults, mixer construction, checkpoints."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from spectralds.errors import NonFiniteError, UserError
from spectralds.layers import available_layers, build_layer, layer_specs, restore_layers
from spectralds.layers.blocks import Block
from spectralds.models.telemetry import LR_CURVE, default_callbacks, forward_flops

SPECTRAL_LAYERS = ("stu", "stu_t", "lds", "lds_ar")  # layers that take seq_len and num_filters


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
    unknown = sorted(set(layer_kwargs) - set(available_layers()))
    if unknown:  # a misspelt name ("atn") would otherwise leave its layers silently unconfigured
        raise UserError(f"layer_kwargs names {', '.join(map(repr, unknown))}, which is not a layer; "
                        f"registered layers: {', '.join(available_layers())}")
    mixers = []
    for i in range(num_layers):
        name = layer_pattern[i % len(layer_pattern)]
        kwargs: dict[str, Any] = {"dim": dim, "seq_len": seq_len}
        if name in SPECTRAL_LAYERS:
            kwargs["num_filters"] = num_filters
        kwargs.update(layer_kwargs.get(name, {}))
        mixers.append(build_layer(name, **kwargs))
    return mixers


def build_blocks(
    num_layers: int,
    layer_pattern: list[str],
    dim: int,
    seq_len: int,
    num_filters: int,
    layer_kwargs: dict[str, dict[str, Any]] | None,
    mlp_ratio: float,
    **block_kwargs: Any,
) -> nn.ModuleList:
    """The models' stack: one `Block` per mixer of `build_mixers`, each with an MLP of width
    mlp_ratio * dim (none for 0); `block_kwargs` go to every Block (norm eps, dropout, MLP options)."""
    hidden = int(mlp_ratio * dim) if mlp_ratio else None
    mixers = build_mixers(num_layers, layer_pattern, dim, seq_len, num_filters, layer_kwargs)
    return nn.ModuleList(Block(dim, m, hidden, **block_kwargs) for m in mixers)


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


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The module's Trainer, or None when it runs outside one (LightningModule.trainer raises then)."""
    try:
        return module.trainer
    except RuntimeError:
        return None


def guard_loss(module: L.LightningModule, loss: torch.Tensor, policy: str) -> bool:
    """Whether `loss` is finite on every rank (they agree first, so all go on, skip or stop together).

    Non-finite: "stop" raises naming the step; "skip" returns False, and the caller returns
    :func:`skipped_step_loss` instead of the loss.
    """
    finite = bool(torch.isfinite(loss))
    trainer = attached_trainer(module)
    if trainer is not None:
        finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
    if finite:
        return True
    if policy == "skip":
        return False
    # Each rank names what it saw: its own non-finite value, or that another rank's loss was.
    seen = f"({loss.item()})" if not torch.isfinite(loss) else "on another rank"
    raise NonFiniteError(
        f"non-finite training loss {seen} at global step {module.global_step}; stopping "
        "(set the model's nonfinite_loss: skip to skip such steps instead)"
    )


def skipped_step_loss(module: nn.Module) -> torch.Tensor:
    """A zero loss whose backward gives every trainable parameter an exact zero gradient.

    Returning None from training_step skips a step on one device but is refused under DDP, whose
    ranks must all run the same backward (its gradient all-reduce). The zeros never see the
    non-finite activations, so no NaN leaks into the gradients; SpectralModule then drops them before
    the optimizer step (see `on_before_optimizer_step`).
    """
    return sum(p.sum() * 0.0 for p in module.parameters() if p.requires_grad)


class SpectralModule(L.LightningModule):
    """What every spectralds model shares: optimizers built from injected callables (so swapped
    layers get fresh ones), default telemetry callbacks (token throughput, one learning-rate curve),
    non-finite steps skipped on every rank alike, and checkpoints that remember swapped/pruned layers."""

    optimizer_factory: Any
    scheduler_factory: Any
    seq_len: int
    _skip_optimizer_step = False

    def configure_optimizers(self):
        # torch validates optimizer and scheduler arguments here (before the first step) with bare
        # ValueErrors; name the culprit in one line instead of a traceback.
        try:
            optimizer = self.optimizer_factory(self.parameters())
        except UserError:
            raise
        except (ValueError, TypeError) as e:
            raise UserError(f"invalid optimizer arguments: {e}") from e
        try:
            # A constant schedule when none is given, so LearningRateMonitor names the curve LR_CURVE.
            scheduler = (
                torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
                if self.scheduler_factory is None
                else self.scheduler_factory(optimizer)
            )
        except UserError:
            raise  # already names its argument (our schedules validate their own)
        except (ValueError, TypeError) as e:
            raise UserError(f"invalid lr_scheduler arguments: {e}") from e
        config = {"scheduler": scheduler, "interval": "step", "name": LR_CURVE}
        return {"optimizer": optimizer, "lr_scheduler": config}

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        # Some schedulers check their arguments only when stepped (StepLR's step_size=0 divides by zero).
        try:
            if metric is None:
                scheduler.step()
            else:
                scheduler.step(metric)
        except UserError:
            raise
        except (ArithmeticError, ValueError, TypeError) as e:
            name = type(scheduler).__name__
            raise UserError(f"lr_scheduler {name} failed at global step {self.global_step}: {e}") from e

    def configure_callbacks(self) -> list[L.Callback]:
        return default_callbacks(attached_trainer(self))

    def train_flops(self, batch: Any) -> float:
        """Training FLOPs of one batch: 3x the forward FLOPs, the usual estimate of forward + backward
        (twice the forward); see :func:`spectralds.models.telemetry.forward_flops` for what is counted."""
        batch_size, length = batch[0].shape[:2]
        return 3 * forward_flops(self, batch_size, length)

    def skip_step(self) -> torch.Tensor:
        """Mark this optimizer step skipped and return the loss that keeps every rank's backward alike.

        No parameter and no optimizer state changes; the step still counts, as Lightning counts it
        (global_step advances and a per-step LR schedule steps). With gradient accumulation the whole
        accumulated step is dropped.
        """
        self._skip_optimizer_step = True
        return skipped_step_loss(self)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._skip_optimizer_step:
            # torch optimizers leave a parameter whose grad is None untouched: no update, no weight decay,
            # no moment or step-count change (a zero grad would still decay weights and move momentum).
            optimizer.zero_grad(set_to_none=True)
            self._skip_optimizer_step = False

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_layer_specs(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        load_layer_specs(self, checkpoint)
