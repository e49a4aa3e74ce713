"""Training telemetry the models add by default: token throughput (and FLOPs), and one learning-rate curve."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ThroughputMonitor
from torch import nn

from spectralds.layers.registry import SequenceLayer

LR_CURVE = "train/lr"  # LearningRateMonitor logs the scheduler under its config's "name"


def forward_flops(module: nn.Module, batch: int, seq_len: int) -> float:
    """Forward FLOPs of `module` on a (batch, seq_len) input; training counts 3x this (backward ~ twice
    the forward, see `train_flops` in `spectralds.models.common`).

    Every sequence layer whose `SequenceLayer.forward_flops` knows its cost reports the path it takes
    for that shape: the STU's chosen arrangement ("kernel" or "project"), STU-T's projection, kernel mix,
    FFTs and products, the LDS scan or convolution (with a learnable system's rebuilt response), attention's
    QK^T and AV over the keys each query sees. FFTs count 2.5 n log2 n per real FFT of length n
    (`spectralds.ops.fft_conv.fft_flops`; conventions in `ops.fft_conv.conv_forward_flops`). Every other
    weight with 2 or more dimensions (linear layers, the attention projections, AR terms, a layer that
    reports None) counts 2 FLOPs (multiply + add) per token per element, except embedding tables (a
    lookup; a tied head counts once, as a linear layer). A parameter its layer reports is never counted
    again. Not counted: norms, activations and other elementwise work.
    """
    reported, claimed = 0.0, set()
    for m in module.modules():
        flops = m.forward_flops(batch, seq_len) if isinstance(m, SequenceLayer) else None
        if flops is not None:
            reported += flops
            claimed.update(id(p) for p in m.parameters(recurse=False))  # submodules: own report or the rule
    tables = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    weights: dict[int, int] = {}
    for m in module.modules():
        for p in m.parameters(recurse=False):
            if p.dim() >= 2:
                weights[id(p)] = p.numel()
        if isinstance(m, nn.Linear):
            tables.discard(id(m.weight))  # a tied head multiplies by the embedding table
    generic = sum(n for key, n in weights.items() if key not in tables and key not in claimed)
    return reported + 2 * batch * seq_len * generic


def flops_per_token(module: nn.Module, seq_len: int, batch: int = 1) -> float:
    """`forward_flops` per token (it depends on the batch: the STU's kernel arrangement builds W(f) once)."""
    return forward_flops(module, batch, seq_len) / (batch * seq_len)


def _compute_dtype(precision: str) -> torch.dtype:
    if "bf16" in precision:
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float64 if precision.startswith("64") else torch.float32


class TokenThroughput(Callback):
    """Logs ``train/tokens_per_sec`` (all ranks together; positions per second for regression) and, when
    the model has a ``train_flops(batch)`` method, ``train/flops_per_sec`` and, on devices whose peak
    Lightning knows, ``train/mfu``.

    Built on Lightning's :class:`~lightning.fabric.utilities.throughput.Throughput` (what its
    ``ThroughputMonitor`` uses, whose metric names are fixed as ``train/device/items_per_sec``): rates are
    rolling means over the last ``window`` steps (default: the steps between two logs), timed after a
    device synchronize, with validation time left out.
    """

    def __init__(self, window: int | None = None) -> None:
        self.window = window
        self._throughput: Throughput | None = None
        self._t0 = self._paused = self._val_t0 = 0.0
        self._batches = self._samples = self._tokens = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        window = self.window or max(2, min(100, trainer.log_every_n_steps + 1))
        peak = get_available_flops(trainer.strategy.root_device, _compute_dtype(str(trainer.precision)))
        self._throughput = Throughput(available_flops=peak, world_size=trainer.world_size, window_size=window)
        self._batches = self._samples = self._tokens = 0
        self._paused = 0.0
        self._t0 = time.perf_counter()

    def _now(self, trainer: L.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # else the clock sees kernels queued, not finished
        return time.perf_counter()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._throughput is not None and not trainer.sanity_checking:
            self._val_t0 = self._now(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._throughput is not None and not trainer.sanity_checking:
            self._paused += self._now(trainer) - self._val_t0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._throughput is None:
            return
        inputs = batch[0]
        self._batches += 1
        self._samples += inputs.shape[0]
        self._tokens += inputs.shape[0] * inputs.shape[1]
        train_flops = getattr(pl_module, "train_flops", None)
        self._throughput.update(
            time=self._now(trainer) - self._t0 - self._paused,
            batches=self._batches,
            samples=self._samples,
            lengths=self._tokens,
            flops=train_flops(batch) if callable(train_flops) else None,
        )
        metrics = self._throughput.compute()
        names = {"items_per_sec": "tokens_per_sec", "flops_per_sec": "flops_per_sec"}
        if trainer.world_size == 1:  # Throughput names the global rates only with several ranks
            names = {f"device/{k}": v for k, v in names.items()}
        logged = {f"train/{v}": metrics[k] for k, v in names.items() if k in metrics}
        if "device/mfu" in metrics:
            logged["train/mfu"] = metrics["device/mfu"]
        if logged:
            pl_module.log_dict(logged, on_step=True, on_epoch=False)


def default_callbacks(trainer: L.Trainer | None) -> list[Callback]:
    """A LearningRateMonitor and a TokenThroughput, each unless the trainer already has one (or no logger)."""
    if trainer is None or not trainer.loggers:
        return []
    present = trainer.callbacks
    callbacks: list[Callback] = []
    if not any(isinstance(c, LearningRateMonitor) for c in present):
        callbacks.append(LearningRateMonitor())
    if not any(isinstance(c, (TokenThroughput, ThroughputMonitor)) for c in present):
        callbacks.append(TokenThroughput())
    return callbacks
