"""LayerAdaptiveStatePruning: LAST pruning of the distilled LDS layers, as a Lightning callback."""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from spectralds.callbacks._common import OneShotLayerChange, log_scalars, rebuild_optimizers, run_validation
from spectralds.distill.prune import METHODS, find_lds_layers, prune_lds_layers
from spectralds.errors import UserError, UserTypeError, check_choice, check_float, check_int


class LayerAdaptiveStatePruning(OneShotLayerChange):
    """Prune `ratio` of all LDS states, layer-adaptively. Methods (`spectralds.distill.prune.METHODS`):
    "last-refit" (the default: ranks each layer's states by how much its re-solved readout loses without
    them, then splits the budget across layers LAST-style; on the quickstart models +0.07% val loss at
    75% pruned where the paper's score loses 10-62%, and a tie within 0.002 points at 25-50%), "last"
    (the paper's H-infinity score, which distilled states defeat: they cancel one another), "uniform",
    "global", "uniform-refit", "random" (seed 0). Fitted layers get their C re-solved for the kept states
    whatever the method.
    When it prunes at the end of training it saves the pruned model to `save_path` ("auto":
    <log dir>/checkpoints/lds_pruned.ckpt; None: no checkpoint).

    Put it after STUToLDSDistillation in the callback list: by default both act at the end of
    training, distillation first. With at_step/at_epoch it prunes then and training continues.
    Pruning is deterministic, so every DDP rank makes the identical choice.
    """

    checkpoint_name = "lds_pruned.ckpt"
    changed_model = "pruned LDS model"

    def __init__(
        self,
        ratio: float = 0.5,
        method: str = "last-refit",
        at_step: int | None = None,
        at_epoch: int | None = None,
        validate: bool = True,
        save_path: str | None = "auto",
    ) -> None:
        # Every argument is checked here, before any training: one UserError each.
        where = "LayerAdaptiveStatePruning"
        ratio = check_float(f"{where}: ratio", ratio, minimum=0.0, strict=True)
        if not ratio < 1:  # 0 prunes nothing, 1 everything: neither is a pruning
            raise UserError(f"{where}: ratio must be in (0, 1), got {ratio!r}")
        check_choice(f"{where}: method", method, METHODS)
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

    def apply(self, trainer: L.Trainer, pl_module: L.LightningModule, continue_training: bool) -> None:
        if not find_lds_layers(pl_module):
            raise UserError(
                "LayerAdaptiveStatePruning found no LDS layer: distill the STU layers first "
                "(put STUToLDSDistillation before it in the callbacks)"
            )
        before = run_validation(trainer) if self.validate else {}
        self.reports = prune_lds_layers(pl_module, self.ratio, self.method)
        self.done = True
        after = run_validation(trainer) if self.validate else {}
        if continue_training:
            rebuild_optimizers(trainer, pl_module)
        self.results = {f"prune/{k.replace('/', '_')}_before": v for k, v in before.items()}
        self.results.update({f"prune/{k.replace('/', '_')}_after": v for k, v in after.items()})
        self.results.update({f"prune/states_kept/{r.path}": r.states_after for r in self.reports})
        log_scalars(trainer, self.results)
        kept = sum(r.states_after for r in self.reports)
        total = sum(r.states_before for r in self.reports)
        lines = [f"LAST pruning ({self.method}, ratio {self.ratio}): kept {kept}/{total} states"]
        lines += [f"  {r.path:<28}{r.states_before:>5} -> {r.states_after}" for r in self.reports]
        for key in sorted(set(before) & set(after)):
            lines.append(f"  {key:<26} before {before[key]:.4f}   after {after[key]:.4f}")
        rank_zero_info("\n".join(lines))
