"""LayerAdaptiveStatePruning: LAST pruning of the distilled LDS layers, as a Lightning callback."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from spectralds.callbacks._common import log_scalars, rebuild_optimizers, run_validation
from spectralds.distill.prune import METHODS, find_lds_layers, prune_lds_layers
from spectralds.layers import layer_specs


class LayerAdaptiveStatePruning(Callback):
    """Prune `ratio` of all LDS states, scored by LAST (or "uniform"/"global" baselines).

    Put it after STUToLDSDistillation in the callback list: by default both act at the end of
    training, distillation first. With at_step/at_epoch it prunes then and training continues.
    Pruning is deterministic, so every DDP rank makes the identical choice.
    """

    def __init__(
        self,
        ratio: float = 0.5,
        method: str = "last",
        at_step: int | None = None,
        at_epoch: int | None = None,
        validate: bool = True,
    ) -> None:
        if not 0 <= ratio < 1:
            raise ValueError(f"pruning ratio must be in [0, 1), got {ratio}")
        if method not in METHODS:
            raise ValueError(f"unknown pruning method {method!r}; expected one of {METHODS}")
        self.ratio, self.method, self.at_step, self.at_epoch = ratio, method, at_step, at_epoch
        self.validate = validate
        self.done = False
        self.results: dict[str, float] = {}
        self.reports: list = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self.done and self.at_step is not None and trainer.global_step >= self.at_step:
            self.prune(trainer, pl_module, continue_training=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.done and self.at_epoch is not None and trainer.current_epoch >= self.at_epoch:
            self.prune(trainer, pl_module, continue_training=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.done and self.at_step is None and self.at_epoch is None:
            self.prune(trainer, pl_module, continue_training=False)

    def prune(self, trainer: L.Trainer, pl_module: L.LightningModule, continue_training: bool) -> None:
        if not find_lds_layers(pl_module):
            raise ValueError(
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

    def state_dict(self) -> dict:
        return {"done": self.done, "results": self.results}

    def load_state_dict(self, state_dict: dict) -> None:
        self.done = state_dict.get("done", False)
        self.results = state_dict.get("results", {})

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["spectralds_layers"] = layer_specs(pl_module)
