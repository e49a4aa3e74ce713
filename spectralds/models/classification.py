"""Sequence classification (Long Range Arena style): embed -> blocks -> norm -> mean over positions -> head.

Any registered layer classifies: a learnable diagonal LDS (`layer_pattern: [lds]` with
`layer_kwargs: {lds: {learnable: true}}`, the trained-SSM case LAST prunes), STU, STU-T or attention.
Batches are ``(ids, lengths, labels)`` (see `spectralds.data.listops.collate`): sequences right-padded,
so a causal layer's outputs at the real positions never see the padding, and the mean runs over the real
positions only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from spectralds.errors import UserError, check_float, check_int
from spectralds.layers.blocks import RMSNorm
from spectralds.models.common import (
    SpectralModule,
    build_blocks,
    check_nonfinite_policy,
    default_optimizer,
    guard_loss,
)
from spectralds.models.lm import _check_config


class SequenceClassifier(SpectralModule):
    """Token ids (batch, T) and lengths (batch,) -> class logits (batch, num_classes).

    Blocks are the language model's (pre-norm mixer, optional SwiGLU MLP); the pooled features go through
    a final RMSNorm and a linear head.
    """

    def __init__(
        self,
        vocab_size: int = 18,
        num_classes: int = 10,
        dim: int = 64,
        num_layers: int = 2,
        layer_pattern: list[str] | None = None,
        seq_len: int = 2000,
        num_filters: int = 16,
        layer_kwargs: dict[str, dict[str, Any]] | None = None,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
        nonfinite_loss: str = "stop",
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        check_nonfinite_policy(nonfinite_loss)
        check_float("dropout", dropout, minimum=0.0, maximum=1.0)
        check_int("num_classes", num_classes, minimum=2)
        _check_config(vocab_size, dim, num_layers, layer_pattern, seq_len, mlp_ratio, layer_kwargs)
        layer_pattern = ["lds"] if layer_pattern is None else list(layer_pattern)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.hparams["layer_pattern"] = layer_pattern
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.seq_len = seq_len
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = build_blocks(
            num_layers, layer_pattern, dim, seq_len, num_filters, layer_kwargs, mlp_ratio,
            dropout=dropout,
        )
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.val_acc = torchmetrics.MeanMetric()
        self.val_nll = torchmetrics.MeanMetric()
        self.test_acc = torchmetrics.MeanMetric()

    def setup(self, stage: str) -> None:
        data = getattr(self.trainer, "datamodule", None)
        for name in ("seq_len", "vocab_size", "num_classes"):
            ours, theirs = getattr(self, name, None) or self.hparams[name], getattr(data, name, 0)
            if theirs > ours:
                raise UserError(f"data {name} {theirs} exceeds the model's {name} {ours}")

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, num_classes); `lengths` (batch,): real tokens per row (default: all)."""
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise UserError(f"token ids must be (batch, tokens) with tokens >= 1, got {tuple(ids.shape)}")
        if ids.shape[1] > self.seq_len:
            raise UserError(f"input of {ids.shape[1]} tokens exceeds the model's seq_len {self.seq_len}")
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        if lengths is None:
            pooled = x.mean(dim=1)
        else:
            lengths = lengths.to(x.device)
            if lengths.shape != ids.shape[:1] or lengths.min() < 1 or lengths.max() > ids.shape[1]:
                raise UserError(f"lengths must be ({ids.shape[0]},) in [1, {ids.shape[1]}]")
            mask = (torch.arange(ids.shape[1], device=x.device) < lengths[:, None]).to(x.dtype)
            pooled = (x * mask[..., None]).sum(dim=1) / lengths[:, None].to(x.dtype)
        return self.head(self.norm(pooled))

    def _step(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        ids, lengths, labels = batch
        logits = self(ids, lengths).float()
        nll = F.cross_entropy(logits, labels, reduction="none")
        return nll, (logits.argmax(-1) == labels).float()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        nll, correct = self._step(batch)
        loss = nll.mean()
        if not guard_loss(self, loss, self.hparams.nonfinite_loss):
            return self.skip_step()
        self.log_dict({"train/loss": loss, "train/acc": correct.mean()}, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        nll, correct = self._step(batch)
        self.val_nll.update(nll)
        self.val_acc.update(correct)

    def on_validation_epoch_end(self) -> None:
        self.log_dict({"val/loss": self.val_nll.compute(), "val/acc": self.val_acc.compute()}, prog_bar=True)
        self.val_nll.reset()
        self.val_acc.reset()

    def test_step(self, batch, batch_idx: int) -> None:
        self.test_acc.update(self._step(batch)[1])

    def on_test_epoch_end(self) -> None:
        self.log("test/acc", self.test_acc.compute())
        self.test_acc.reset()


@torch.inference_mode()
def accuracy(model: nn.Module, batches) -> float:
    """Fraction of correct predictions of `model` over `batches` of ``(ids, lengths, labels)``."""
    correct = total = 0
    for ids, lengths, labels in batches:
        correct += int((model(ids, lengths).argmax(-1) == labels).sum())
        total += labels.numel()
    return correct / total
