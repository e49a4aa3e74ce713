"""STUToLDSDistillation: swap every STU layer of a LightningModule for its fitted LDS layer."""

from __future__ import annotations

import os

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from spectralds.callbacks._common import (
    OneShotLayerChange,
    log_figure,
    log_scalars,
)
from spectralds.distill import FIT_METHODS, LDSFit, load_fit
from spectralds.distill.convert import check_fit_matches, find_stu_layers, measure_layer
from spectralds.distill.fit import check_fit_args
from spectralds.distill.lds_file import filter_error
from spectralds.distill.swap import (
    DEFAULT_MAX_FIT_ERROR,
    default_state_dim,
    distill_stu_layers,
    distillation_table,
    layer_fit,
)
from spectralds.errors import UserError, UserTypeError, check_choice, check_float, check_int


class STUToLDSDistillation(OneShotLayerChange):
    """Replace the STU layers (found by type, anywhere in the module) with LDS layers carrying their M.

    Args:
        state_dim: states of the fitted LDS (shared by all layers); None: `STATE_DIM_RULE`
            (`spectralds.distill.swap`).
        method: filter-fit method (None: the library's best).
        fit_path: load this LDS file instead of fitting (it must match the layers' L, K and variant).
        at_step / at_epoch: swap after this global step / at the end of this epoch (0-based) and keep
            training the LDS model; default (both None): at the end of training.
        validate: run validation before and after the swap and log both losses.
        max_fit_error: refuse to swap when a converted layer, measured against the STU it replaces,
            misses by more than this relative MSE: its impulse response against the layer's own filters,
            its output against the STU's on a fixed probe input, or its float32 forward and decoding
            against its own float64 forward (`spectralds.distill.convert`, `run_precision`). All
            layers are measured before any is swapped. Tensorized filters, for instance, are not
            realizable by a small LDS (rel. MSE ~0.3 at 160 states).

    Every argument is checked when the callback is built, and against the model when fit starts (a
    missing, corrupt or mismatched `fit_path`, a state_dim the layers' length cannot take), before the
    first step. A run resumed from a checkpoint written after the swap is not checked: it needs no fit.
        save_path: where to save a checkpoint of the swapped model at the end of training
            ("auto": <log_dir>/checkpoints/lds.ckpt; None: don't).
    """

    checkpoint_name = "lds.ckpt"
    changed_model = "distilled LDS model"
    results_prefix = "distill"

    def __init__(
        self,
        state_dim: int | None = None,
        method: str | None = None,
        fit_path: str | None = None,
        at_step: int | None = None,
        at_epoch: int | None = None,
        validate: bool = True,
        max_fit_error: float = DEFAULT_MAX_FIT_ERROR,
        save_path: str | None = "auto",
        log_plot: bool = True,
    ) -> None:
        check_arguments(state_dim, method, fit_path, at_step, at_epoch, max_fit_error)
        for name, value in (("validate", validate), ("log_plot", log_plot)):
            if not isinstance(value, bool):
                raise UserTypeError(f"STUToLDSDistillation: {name} must be true or false, got {value!r}")
        if save_path is not None and not isinstance(save_path, (str, os.PathLike)):
            raise UserTypeError(f"STUToLDSDistillation: save_path must be a path, 'auto' or None, "
                                f"got {save_path!r}")
        super().__init__(at_step, at_epoch, save_path)
        self.state_dim, self.method, self.fit_path = state_dim, method, fit_path
        self.validate, self.log_plot = validate, log_plot
        self.max_fit_error = float(max_fit_error)
        self.reports: list = []
        self._user_fit: LDSFit | None = None
        self._checked = False

    # ---- when ---------------------------------------------------------------------------------
    # The model is checked before the first step, not at the swap, but after a resumed checkpoint is
    # restored: only then do `done` and the layers say whether the swap already happened. Lightning
    # restores before on_fit_start, except under strategies that restore after their setup (FSDP).
    def check_resumed(self, state: dict | None, source: str = "the checkpoint") -> None:
        """A run resumed from a checkpoint distilled with other fit arguments would keep its LDS layers
        while the config says otherwise: refused. Lightning calls this as it restores the callback; the
        CLI earlier, before the run writes anything (spectralds.cli_lightning)."""
        if not state or not state.get("done"):
            return  # not swapped yet: the swap will use the config's arguments
        for name in ("state_dim", "method"):
            if name in state and state[name] != getattr(self, name):
                raise UserError(
                    f"STUToLDSDistillation: {name} is {getattr(self, name)!r} in the config but {source} was "
                    f"distilled with {state[name]!r}; its LDS layers stay as they are: set {name} to "
                    f"{state[name]!r}, or resume from a checkpoint saved before the swap"
                )

    def load_state_dict(self, state_dict: dict) -> None:
        self.check_resumed(state_dict)
        super().load_state_dict(state_dict)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.strategy.restore_checkpoint_after_setup:
            self._check_model(pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_model(pl_module)
        super().on_train_start(trainer, pl_module)

    def _check_model(self, pl_module: L.LightningModule) -> None:
        if self.done or self._checked:
            return
        layers = find_stu_layers(pl_module)
        if not layers:
            raise UserError(f"STUToLDSDistillation: no STU layer in {type(pl_module).__name__} to distill")
        if self.fit_path is not None:
            self._user_fit = self._check_user_fit(layers)
        else:
            for _, stu in layers:  # the arguments get_fit will get at the swap
                method = self.method or FIT_METHODS[0]
                check_fit_args(stu.seq_len, stu.num_filters, self._state_dim(stu), method)
        self._checked = True

    def _check_user_fit(self, layers: list[tuple[str, torch.nn.Module]]) -> LDSFit:
        fit = load_fit(self.fit_path)  # exists, parses, passes its hash
        for path, stu in layers:
            try:
                check_fit_matches(stu, fit)
                # Measured against this layer's own filter buffer: a fit of other filters (another
                # column order, other signs) is refused before training, not after it.
                error = filter_error(fit, stu.phi)
            except UserError as err:
                raise UserError(f"fit_path {self.fit_path} does not fit layer {path}: {err}") from None
            if not error <= self.max_fit_error:
                raise UserError(
                    f"fit_path {self.fit_path}: its impulse response misses the filters of layer {path} by "
                    f"relative MSE {error:.2e} (> max_fit_error {self.max_fit_error:g})"
                )
            try:  # measured as the swap will measure it, float32 decoding included
                measure_layer(path, stu, fit, max_error=self.max_fit_error)
            except UserError as err:
                raise UserError(f"fit_path {self.fit_path}: {err}") from None
        return fit

    # ---- what: spectralds.distill.swap, shared with `spectralds distill` ----------------------
    def _state_dim(self, stu: torch.nn.Module) -> int:
        return self.state_dim or default_state_dim(stu.seq_len)

    def fit_for(self, trainer: L.Trainer, stu: torch.nn.Module) -> LDSFit:
        if self.fit_path is not None:
            if self._user_fit is None:  # not checked (a direct call): the swap measures it
                self._user_fit = load_fit(self.fit_path)
            return self._user_fit
        if trainer.world_size > 1:  # rank 0 fits and caches; the others then read the same bytes
            if trainer.is_global_zero:
                layer_fit(stu, self.state_dim, self.method)
            trainer.strategy.barrier("spectralds-fit")
        return layer_fit(stu, self.state_dim, self.method)

    def apply(self, trainer: L.Trainer, pl_module: L.LightningModule, continue_training: bool) -> None:
        # Every layer is measured against its STU and refused above max_fit_error before any swap.
        before, after, (self.reports, fits) = self.validated_change(
            trainer, pl_module, continue_training,
            lambda: distill_stu_layers(pl_module, lambda stu: self.fit_for(trainer, stu), self.max_fit_error),
            before="stu", after="lds")
        self.results.update({f"distill/layer_rel_mse/{r.path}": r.rel_mse for r in self.reports})
        self.results.update(
            {f"distill/layer_filter_rel_mse/{r.path}": r.filter_rel_mse for r in self.reports})
        self.results.update({f"distill/layer_run_rel_mse/{r.path}": r.run_rel_mse for r in self.reports})
        log_scalars(trainer, self.results)
        if self.log_plot and trainer.is_global_zero and fits:
            from spectralds.distill.plots import filter_fit_figure

            log_figure(trainer, "distill/filters_vs_lds", filter_fit_figure(fits[0]))
        rank_zero_info(distillation_table(self.reports, before, after))

    def state_dict(self) -> dict:  # the fit's arguments too: a resume that changes them is refused
        return {**super().state_dict(), "state_dim": self.state_dim, "method": self.method}


def check_arguments(
    state_dim: object, method: object, fit_path: object, at_step: object, at_epoch: object,
    max_fit_error: object,
) -> None:
    """STUToLDSDistillation's arguments on their own (the model is checked in `setup`): one UserError each."""
    where = "STUToLDSDistillation"
    if state_dim is not None:
        check_int(f"{where}: state_dim", state_dim, minimum=2)
    if method is not None:
        check_choice(f"{where}: method", method, FIT_METHODS)
        if method == "spectralds" and state_dim is not None and state_dim % 2:
            raise UserError(f"{where}: state_dim must be even for the mirrored 'spectralds' fit, "
                            f"got {state_dim}")
    if fit_path is not None:
        if not isinstance(fit_path, (str, os.PathLike)) or str(fit_path) == "":
            raise UserTypeError(f"{where}: fit_path must be a file path, got {fit_path!r}")
        if state_dim is not None or method is not None:
            raise UserError(f"{where}: give fit_path or state_dim/method (to fit one), not both")
    for name, value in (("at_step", at_step), ("at_epoch", at_epoch)):
        if value is not None:
            check_int(f"{where}: {name}", value, minimum=0)
    check_float(f"{where}: max_fit_error", max_fit_error, minimum=0.0, strict=True)
