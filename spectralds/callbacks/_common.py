"""Lightning internals the callbacks share: validating mid-run and rebuilding optimizers after a swap."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy


def run_validation(trainer: L.Trainer) -> dict[str, float]:
    """Run the fit's validation loop now (as Lightning does mid-epoch) and return the val/ metrics."""
    loop = trainer.fit_loop.epoch_loop.val_loop
    was_training = trainer.training
    first_iter = trainer._logger_connector._first_loop_iter
    trainer.validating = True
    loop.run()
    trainer.training = was_training
    trainer._logger_connector._first_loop_iter = first_iter
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


def rebuild_optimizers(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """New parameters after a swap: re-wrap DDP and rebuild optimizers/schedulers from the module."""
    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        raise ValueError("swapping layers mid-run is not supported under FSDP; swap at the end of training")
    if isinstance(strategy, DDPStrategy):
        strategy.model = strategy._setup_model(pl_module)
        strategy._register_ddp_hooks()
    strategy.setup_optimizers(trainer)


def log_scalars(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def log_figure(trainer: L.Trainer, tag: str, figure) -> None:  # noqa: ANN001 - a matplotlib Figure
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_figure"):
            experiment.add_figure(tag, figure, global_step=trainer.global_step)
