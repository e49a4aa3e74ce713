"""STUToLDSDistillation: swap every STU layer of a LightningModule for its fitted LDS layer."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from spectralds.callbacks._common import (
    OneShotLayerChange,
    log_figure,
    log_scalars,
    rebuild_optimizers,
    run_validation,
)
from spectralds.distill import LDSFit, get_fit, load_fit
from spectralds.distill.convert import check_fit_matches, convert_stu_layers, find_stu_layers
from spectralds.errors import UserError


class STUToLDSDistillation(OneShotLayerChange):
    """Replace the STU layers (found by type, anywhere in the module) with LDS layers carrying their M.

    Args:
        state_dim: states of the fitted LDS (shared by all layers); None: min(80, seq_len // 4), even.
        method: filter-fit method (None: the library's best).
        fit_path: load this LDS file instead of fitting (it must match the layers' L, K and variant).
        at_step / at_epoch: swap after this global step / at the end of this epoch (0-based) and keep
            training the LDS model; default (both None): at the end of training.
        validate: run validation before and after the swap and log both losses.
        max_fit_error: refuse to swap when the fit's relative MSE (float64 or float32) exceeds this;
            tensorized filters, for instance, are not realizable by a small LDS (rel. MSE ~0.3 at 160 states).
        save_path: where to save a checkpoint of the swapped model at the end of training
            ("auto": <log_dir>/checkpoints/lds.ckpt; None: don't).
    """

    checkpoint_name = "lds.ckpt"
    changed_model = "distilled LDS model"

    def __init__(
        self,
        state_dim: int | None = None,
        method: str | None = None,
        fit_path: str | None = None,
        at_step: int | None = None,
        at_epoch: int | None = None,
        validate: bool = True,
        max_fit_error: float = 1e-6,
        save_path: str | None = "auto",
        log_plot: bool = True,
    ) -> None:
        super().__init__(at_step, at_epoch, save_path)
        self.state_dim, self.method, self.fit_path = state_dim, method, fit_path
        self.validate, self.log_plot = validate, log_plot
        self.max_fit_error = max_fit_error
        self.reports: list = []

    # ---- when ---------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.done and not find_stu_layers(pl_module):
            raise UserError(f"STUToLDSDistillation: no STU layer in {type(pl_module).__name__} to distill")

    # ---- what ---------------------------------------------------------------------------------
    def fit_for(self, trainer: L.Trainer, stu: torch.nn.Module) -> LDSFit:
        if self.fit_path is not None:
            return load_fit(self.fit_path, expect_num_filters=stu.num_filters, expect_variant=stu.variant)
        kwargs = {"method": self.method} if self.method else {}
        state_dim = self.state_dim or max(2, min(80, stu.seq_len // 4) // 2 * 2)
        args = (stu.seq_len, stu.num_filters, state_dim, stu.variant)
        if trainer.world_size > 1:  # rank 0 fits and caches; the others then read the same bytes
            if trainer.is_global_zero:
                get_fit(*args, **kwargs)
            trainer.strategy.barrier("spectralds-fit")
        return get_fit(*args, **kwargs)

    def _checked(self, fit: LDSFit) -> LDSFit:
        error = max(fit.rel_mse_f64, fit.rel_mse_f32)
        if not error <= self.max_fit_error:
            raise UserError(
                f"the {fit.state_dim}-state LDS fits the {fit.num_filters} {fit.variant!r} filters of length "
                f"{fit.seq_len} only to relative MSE {error:.2e} (> max_fit_error {self.max_fit_error:g}); "
                "refusing to swap rather than silently degrade the model"
            )
        return fit

    def apply(self, trainer: L.Trainer, pl_module: L.LightningModule, continue_training: bool) -> None:
        before = run_validation(trainer) if self.validate else {}
        fits: dict[tuple, LDSFit] = {}

        def get(stu):  # noqa: ANN001, ANN202
            key = (stu.seq_len, stu.num_filters, stu.variant)
            if key not in fits:
                fit = self.fit_for(trainer, stu)
                check_fit_matches(stu, fit)  # a wrong file is the clearer error than a poor fit
                fits[key] = self._checked(fit)
            return fits[key]

        self.reports = convert_stu_layers(pl_module, get)
        self.done = True
        after = run_validation(trainer) if self.validate else {}
        if continue_training:
            rebuild_optimizers(trainer, pl_module)
        self.results = {f"distill/{k.replace('/', '_')}_stu": v for k, v in before.items()}
        self.results.update({f"distill/{k.replace('/', '_')}_lds": v for k, v in after.items()})
        self.results.update({f"distill/layer_rel_mse/{r.path}": r.rel_mse for r in self.reports})
        log_scalars(trainer, self.results)
        if self.log_plot and trainer.is_global_zero and fits:
            from spectralds.distill.plots import filter_fit_figure

            log_figure(trainer, "distill/filters_vs_lds", filter_fit_figure(next(iter(fits.values()))))
        self._print_summary(before, after)

    def _print_summary(self, before: dict[str, float], after: dict[str, float]) -> None:
        lines = ["STU -> LDS distillation", f"{'layer':<28}{'states':>8}{'rel. MSE vs STU':>18}"]
        lines += [f"{r.path:<28}{r.state_dim:>8}{r.rel_mse:>18.3e}" for r in self.reports]
        for key in sorted(set(before) & set(after)):
            lines.append(f"{key:<28} STU {before[key]:.4f}   LDS {after[key]:.4f}")
        rank_zero_info("\n".join(lines))
