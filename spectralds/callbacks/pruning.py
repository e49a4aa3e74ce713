"""LayerAdaptiveStatePruning: LAST pruning of the distilled LDS layers, as a Lightning callback."""

from __future__ import annotations

import math
import os

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from spectralds.callbacks._common import OneShotLayerChange, log_scalars
from spectralds.callbacks.distillation import STUToLDSDistillation
from spectralds.distill.prune import (
    DEFAULT_METHOD,
    PRUNE_METHODS,
    check_ratio,
    find_lds_layers,
    prune_lds_layers,
    pruning_table,
)
from spectralds.errors import UserError, UserTypeError, check_choice, check_int


class LayerAdaptiveStatePruning(OneShotLayerChange):
    """Prune `ratio` of all LDS states, layer-adaptively. Methods (`spectralds.distill.prune.PRUNE_METHODS`):
    "last-refit" (the default: ranks each layer's states by how much its re-solved readout loses without
    them, then splits the budget across layers LAST-style; on the quickstart models +0.07% val loss at
    75% pruned where the paper's score loses 10-62%, and a tie within 0.002 points at 25-50%), "last"
    (the paper's H-infinity score, which distilled states defeat: they cancel one another), "uniform",
    "global", "uniform-refit", "random" (seed 0). Fitted layers get their C re-solved for the kept states
    whatever the method.
    When it prunes at the end of training it saves the pruned model to `save_path` ("auto":
    <log dir>/checkpoints/lds_pruned.ckpt; None: no checkpoint).

    Put it after STUToLDSDistillation in the callback list: by default both act at the end of
    training, distillation first. With at_step/at_epoch it prunes then and training continues. A
    pruning with no distillation to act before it (and no LDS layer yet) is refused before the first step.
    Pruning is deterministic, so every DDP rank makes the identical choice.
    """

    checkpoint_name = "lds_pruned.ckpt"
    changed_model = "pruned LDS model"
    results_prefix = "prune"

    def __init__(
        self,
        ratio: float = 0.5,
        method: str = DEFAULT_METHOD,
        at_step: int | None = None,
        at_epoch: int | None = None,
        validate: bool = True,
        save_path: str | None = "auto",
    ) -> None:
        # Every argument is checked here, before any training: one UserError each.
        where = "LayerAdaptiveStatePruning"
        ratio = check_ratio(f"{where}: ratio", ratio)
        check_choice(f"{where}: method", method, PRUNE_METHODS)
        for name, value in (("at_step", at_step), ("at_epoch", at_epoch)):
            if value is not None:
                check_int(f"{where}: {name}", value, minimum=0)
        if not isinstance(validate, bool):
            raise UserTypeError(f"{where}: validate must be true or false, got {validate!r}")
        if save_path is not None and not isinstance(save_path, (str, os.PathLike)):
            raise UserTypeError(f"{where}: save_path must be a path, 'auto' or None, got {save_path!r}")
        super().__init__(at_step, at_epoch, save_path)
        self.ratio, self.method, self.validate = ratio, method, validate
        self.reports: list = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After a resumed checkpoint is restored (its layers may be LDS already), before the first step.
        if not self.done and not find_lds_layers(pl_module):
            self._check_distilled_first(trainer)
        super().on_train_start(trainer, pl_module)

    def _check_distilled_first(self, trainer: L.Trainer) -> None:
        """A distillation that swaps the layers no later than this pruning, or a UserError now."""
        callbacks = list(trainer.callbacks)
        mine = callbacks.index(self)
        distills = [(i, c) for i, c in enumerate(callbacks) if isinstance(c, STUToLDSDistillation)]
        if not distills:
            raise UserError("LayerAdaptiveStatePruning: the model has no LDS layer and no "
                            "STUToLDSDistillation makes one: distill the STU layers first (list "
                            "STUToLDSDistillation, e.g. callbacks/distill.yaml, before the pruning)")
        if not any(_acts_first((i, c), (mine, self)) for i, c in distills):
            when = _moment_text(self)
            raise UserError(f"LayerAdaptiveStatePruning ({when}) would run before STUToLDSDistillation "
                            f"({_moment_text(distills[0][1])}): list the distillation first, to act no later")

    def apply(self, trainer: L.Trainer, pl_module: L.LightningModule, continue_training: bool) -> None:
        if not find_lds_layers(pl_module):
            raise UserError(
                "LayerAdaptiveStatePruning found no LDS layer: distill the STU layers first "
                "(put STUToLDSDistillation before it in the callbacks)"
            )
        before, after, self.reports = self.validated_change(
            trainer, pl_module, continue_training,
            lambda: prune_lds_layers(pl_module, self.ratio, self.method), before="before", after="after")
        self.results.update({f"prune/states_kept/{r.path}": r.states_after for r in self.reports})
        log_scalars(trainer, self.results)
        rank_zero_info(pruning_table(self.reports, self.method, self.ratio, before, after))


def _moment(change: OneShotLayerChange) -> tuple[str, float]:
    """When a one-shot change acts: ("step", n), ("epoch", n) or ("end", inf)."""
    if change.at_step is not None:
        return "step", change.at_step
    if change.at_epoch is not None:
        return "epoch", change.at_epoch
    return "end", math.inf


def _moment_text(change: OneShotLayerChange) -> str:
    kind, value = _moment(change)
    return "at the end of training" if kind == "end" else f"at_{kind} {value}"


def _acts_first(first: tuple[int, OneShotLayerChange], then: tuple[int, OneShotLayerChange]) -> bool:
    """Whether `first` (index in the callbacks, change) acts before `then`: an earlier moment, or the same
    one and listed before it (Lightning calls one hook in list order). Steps and epochs are not compared:
    given so, the order is the user's."""
    (i, a), (j, b) = first, then
    (kind_a, at_a), (kind_b, at_b) = _moment(a), _moment(b)
    if kind_a != kind_b and "end" not in (kind_a, kind_b):
        return True
    return (at_a, i) < (at_b, j)
