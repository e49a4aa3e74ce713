"""What the callbacks share: validating mid-run, rebuilding optimizers after a swap, a one-shot change."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from spectralds.callbacks.final_save import save_final_weights
from spectralds.compat import first_loop_iter, set_first_loop_iter
from spectralds.errors import UserError
from spectralds.layers import layer_specs


def run_validation(trainer: L.Trainer) -> dict[str, float]:
    """Run the fit's validation loop now (as Lightning does mid-epoch) and return the val/ metrics."""
    # trainer.validate() cannot run inside fit; this is what the fit loop does at val_check_interval.
    loop = trainer.fit_loop.epoch_loop.val_loop
    was_training = trainer.training
    first_iter = first_loop_iter(trainer)
    trainer.validating = True
    loop.run()
    trainer.training = was_training
    set_first_loop_iter(trainer, first_iter)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


def rebuild_optimizers(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """New parameters after a swap: re-wrap DDP and rebuild optimizers/schedulers from the module."""
    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        raise UserError("swapping layers mid-run is not supported under FSDP; swap at the end of training")
    if isinstance(strategy, DDPStrategy):
        # configure_ddp wraps strategy.model, which must be the bare module again (not the old wrapper).
        strategy.model = pl_module
        strategy.configure_ddp()
    strategy.setup_optimizers(trainer)


def log_scalars(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def log_figure(trainer: L.Trainer, tag: str, figure) -> None:  # noqa: ANN001 - a matplotlib Figure
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_figure"):
            experiment.add_figure(tag, figure, global_step=trainer.global_step)


class OneShotLayerChange(Callback):
    """A change applied once: after `at_step`, at the end of epoch `at_epoch`, or (default) at the end of
    training. Subclasses implement `apply(trainer, pl_module, continue_training)` and set `self.done`.

    A change made at the end of training is checkpointed to `save_path` ("auto": <log dir>/checkpoints/
    `checkpoint_name`; None: not saved), since no later checkpoint would hold it.
    """

    checkpoint_name = "changed.ckpt"
    changed_model = "changed model"  # for the log line
    results_prefix = "change"  # logged metrics: <prefix>/...
    validate = True

    def __init__(self, at_step: int | None, at_epoch: int | None, save_path: str | None = None) -> None:
        if at_step is not None and at_epoch is not None:
            raise UserError("give at_step or at_epoch, not both")
        self.at_step, self.at_epoch, self.save_path = at_step, at_epoch, save_path
        self.done = False
        self.results: dict[str, float] = {}
        self.saved_to: str | None = None  # where the changed model was saved at the end of training

    def apply(self, trainer: L.Trainer, pl_module: L.LightningModule, continue_training: bool) -> None:
        raise NotImplementedError

    def validated_change(
        self, trainer: L.Trainer, pl_module: L.LightningModule, continue_training: bool,
        change: Callable[[], Any],
        before: str, after: str,
    ) -> tuple[dict[str, float], dict[str, float], Any]:
        """Run `change()` between two validations (when `self.validate`), mark the change done, rebuild the
        optimizers when training goes on, and put the validation metrics in `self.results` as
        "<prefix>/<metric>_<before>" and "..._<after>". Returns (before, after, what change returned)."""
        prefix = self.results_prefix
        metrics_before = run_validation(trainer) if self.validate else {}
        outcome = change()
        self.done = True
        if continue_training:  # before validating: a SIGTERM there saves a model and optimizer that match
            rebuild_optimizers(trainer, pl_module)
        metrics_after = run_validation(trainer) if self.validate else {}
        self.results = {f"{prefix}/{k.replace('/', '_')}_{before}": v for k, v in metrics_before.items()}
        self.results.update({f"{prefix}/{k.replace('/', '_')}_{after}": v for k, v in metrics_after.items()})
        return metrics_before, metrics_after, outcome

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self.done and self.at_step is not None and trainer.global_step >= self.at_step:
            self.apply(trainer, pl_module, continue_training=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.done and self.at_epoch is not None and trainer.current_epoch >= self.at_epoch:
            self.apply(trainer, pl_module, continue_training=True)

    # ---- checked before the first step --------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._check_save_path(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.done:  # the training data is loaded by now: its batches per epoch are known
            self._check_reachable(trainer)

    def save_target(self, trainer: L.Trainer) -> str | None:
        """Where the change made at the end of training is saved (None: not saved)."""
        if not self.save_path:
            return None
        if self.save_path == "auto":
            log_dir = trainer.log_dir or trainer.default_root_dir
            return os.path.join(log_dir, "checkpoints", self.checkpoint_name)
        return os.fspath(self.save_path)

    def _check_save_path(self, trainer: L.Trainer) -> None:
        path = self.save_target(trainer)
        if path is not None and os.path.isdir(path):
            raise UserError(f"{type(self).__name__}: save_path {path} is a directory; the "
                            f"{self.changed_model} would not be saved: name a file")

    def _check_reachable(self, trainer: L.Trainer) -> None:
        """at_step / at_epoch the run reaches, or a UserError now rather than a change that never happens."""
        if self.at_step is None and self.at_epoch is None:
            return
        steps = trainer.estimated_stepping_batches  # the run's optimizer steps (inf: no bound)
        if steps < 0:  # max_steps -1 over unsized data: Lightning returns max_steps itself
            steps = math.inf
        per_epoch = trainer.num_training_batches / trainer.accumulate_grad_batches
        where = type(self).__name__
        if self.at_step is not None and self.at_step > steps:
            raise UserError(f"{where}: at_step {self.at_step} is beyond the run's end (it stops after "
                            f"{steps} steps): the change would never be made")
        epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else math.inf
        if math.isfinite(steps) and math.isfinite(per_epoch) and per_epoch > 0:
            epochs = min(epochs, math.ceil(steps / math.ceil(per_epoch)))
        if self.at_epoch is not None and self.at_epoch >= epochs:
            raise UserError(f"{where}: at_epoch {self.at_epoch} is beyond the run's end (its last epoch is "
                            f"{epochs - 1}, counting from 0): the change would never be made")

    # ---- the end of training -------------------------------------------------------------------------
    def on_train_end(self, trainer, pl_module) -> None:
        # The trained model first, at its true last step, before this or any later change alters it.
        save_final_weights(trainer)
        if self.at_step is not None or self.at_epoch is not None:
            return
        if not self.done:
            if trainer.received_sigterm:  # stopped: no new stage starts (SaveOnSignal reports)
                raise SIGTERMException()
            self.apply(trainer, pl_module, continue_training=False)
        path = self.save_target(trainer)
        if self.done and path is not None:
            trainer.save_checkpoint(path, weights_only=False)  # full: it can resume training
            self.saved_to = path
            rank_zero_info(f"saved the {self.changed_model} to {path}")

    def state_dict(self) -> dict:
        return {"done": self.done, "results": self.results}

    def load_state_dict(self, state_dict: dict) -> None:
        self.done = state_dict.get("done", False)
        self.results = state_dict.get("results", {})

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # Lets any LightningModule rebuild the changed layers: see spectralds.layers.restore_layers.
        checkpoint["spectralds_layers"] = layer_specs(pl_module)
