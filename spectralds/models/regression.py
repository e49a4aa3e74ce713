"""Sequence-to-sequence regression (the SpectraLDS paper's synthetic LDS task): MSE per position."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from spectralds.models.common import (
    SpectralModule,
    build_blocks,
    check_nonfinite_policy,
    default_optimizer,
    guard_loss,
)


class SequenceRegression(SpectralModule):
    """in_proj -> blocks (RMSNorm, mixer, optional MLP) -> out_proj; no MLP by default.

    prenorm=True (the default, as in the language models) puts an RMSNorm before each mixer. It makes the
    model non-linear, which sets an error floor on a linear target: on configs/synthetic.yaml, 4.5e-5
    val MSE after 200 steps against 1.1e-7 for the bare STU layer. prenorm=False (the synthetic configs)
    drops it: with linear mixers and no MLP the whole model is linear, like the system it learns.
    zero_init_out=True starts out_proj at zero, so the model starts as the zero predictor, as a bare layer
    nearly does; measured on that config with prenorm=False (200 steps, first 64 val sequences): 2.8e-6
    with the default init, 5.5e-8 with it (see tools/synthetic_lds.md)."""

    def __init__(
        self,
        d_in: int = 16,
        d_out: int = 16,
        dim: int = 32,
        num_layers: int = 1,
        layer_pattern: list[str] | None = None,
        seq_len: int = 256,
        num_filters: int = 24,
        layer_kwargs: dict[str, dict[str, Any]] | None = None,
        mlp_ratio: float = 0.0,
        prenorm: bool = True,
        zero_init_out: bool = False,
        nonfinite_loss: str = "stop",
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        check_nonfinite_policy(nonfinite_loss)
        layer_pattern = list(layer_pattern or ["stu"])
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.hparams["layer_pattern"] = layer_pattern
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.in_proj = nn.Linear(d_in, dim, bias=False)
        self.blocks = build_blocks(
            num_layers, layer_pattern, dim, seq_len, num_filters, layer_kwargs, mlp_ratio,
            prenorm=prenorm,
        )
        self.out_proj = nn.Linear(dim, d_out, bias=False)
        if zero_init_out:
            nn.init.zeros_(self.out_proj.weight)
        self.val_mse = torchmetrics.MeanSquaredError()
        self.test_mse = torchmetrics.MeanSquaredError()

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        x = self.in_proj(u)
        for block in self.blocks:
            x = block(x)
        return self.out_proj(x)

    def per_position_mse(self, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(T,) mean squared error at each position, for length-generalization plots."""
        return (self(u) - y).pow(2).mean(dim=(0, 2))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        u, y = batch
        loss = F.mse_loss(self(u), y)
        if not guard_loss(self, loss, self.hparams.nonfinite_loss):
            return self.skip_step()  # every rank skips this step (a None return is refused under DDP)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        u, y = batch
        self.val_mse.update(self(u), y)

    def on_validation_epoch_end(self) -> None:
        mse = self.val_mse.compute()
        self.log_dict({"val/mse": mse, "val/loss": mse}, prog_bar=True)
        self.val_mse.reset()

    def test_step(self, batch, batch_idx: int) -> None:
        u, y = batch
        self.test_mse.update(self(u), y)

    def on_test_epoch_end(self) -> None:
        self.log("test/mse", self.test_mse.compute())
        self.test_mse.reset()
