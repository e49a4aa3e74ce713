"""TokenThroughput: tokens per second, FLOPs per second and MFU of a training run, as TensorBoard scalars."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch.callbacks import Callback

from spectralds.errors import check_int


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
    ``ThroughputMonitor`` uses, whose metric names are fixed as ``train/device/items_per_sec``). Unlike
    that monitor it does not synchronize the device every step: the clock is read (after a synchronize,
    else it would see kernels queued, not finished) once every ``every`` steps (default: the trainer's
    log_every_n_steps), and the rates logged in between are those of the last such interval. Validation
    time is left out.
    """

    def __init__(self, every: int | None = None) -> None:
        if every is not None:
            check_int("TokenThroughput every", every, minimum=1)
        self.every = every
        self._throughput: Throughput | None = None
        self._t0 = self._paused = self._val_t0 = 0.0
        self._batches = self._samples = self._tokens = 0
        self._flops = 0.0
        self._logged: dict[str, float] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        peak = get_available_flops(trainer.strategy.root_device, _compute_dtype(str(trainer.precision)))
        # Two points: the rates of the interval between the last two clock readings.
        self._throughput = Throughput(available_flops=peak, world_size=trainer.world_size, window_size=2)
        self._batches = self._samples = self._tokens = 0
        self._flops, self._paused, self._logged = 0.0, 0.0, {}
        self._t0 = self._now(trainer)

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
        if callable(train_flops):
            self._flops += train_flops(batch)
        if self._batches == 1 or self._batches % (self.every or max(1, trainer.log_every_n_steps)) == 0:
            self._logged = self._measure(trainer, has_flops=callable(train_flops))
        if self._logged:
            pl_module.log_dict(self._logged, on_step=True, on_epoch=False)

    def _measure(self, trainer: L.Trainer, has_flops: bool) -> dict[str, float]:
        """Read the clock and return the rates since the previous reading, as logged metrics."""
        self._throughput.update(
            time=self._now(trainer) - self._t0 - self._paused,
            batches=self._batches,
            samples=self._samples,
            lengths=self._tokens,
            flops=self._flops if has_flops else None,  # Throughput wants the FLOPs since its last update
        )
        self._flops = 0.0
        metrics = self._throughput.compute()
        names = {"items_per_sec": "tokens_per_sec", "flops_per_sec": "flops_per_sec"}
        if trainer.world_size == 1:  # Throughput names the global rates only with several ranks
            names = {f"device/{k}": v for k, v in names.items()}
        logged = {f"train/{v}": metrics[k] for k, v in names.items() if k in metrics}
        if "device/mfu" in metrics:
            logged["train/mfu"] = metrics["device/mfu"]
        return logged
