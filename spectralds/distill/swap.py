"""Distilling a whole module: one fit per filter bank, every STU layer converted and measured, the table.

This is the one implementation behind both `STUToLDSDistillation` (mid-run or at the end of training)
and `spectralds distill` (a saved checkpoint, no training): the defaults of both live here.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from spectralds.distill.cache import get_fit
from spectralds.distill.convert import LayerReport, convert_stu_layers
from spectralds.distill.lds_file import LDSFit

# Relative MSE above which a converted layer (impulse response or probe output) refuses the swap.
DEFAULT_MAX_FIT_ERROR = 1e-6
MAX_DEFAULT_STATES = 80  # fits K=24 filters to ~1e-20 at L=8192
STATE_DIM_RULE = f"min({MAX_DEFAULT_STATES}, seq_len // 4), even"  # for help texts


def default_state_dim(seq_len: int) -> int:
    """The states of a layer's fit when none are asked for: `STATE_DIM_RULE` (a fit needs several
    samples per state, and the mirrored fit an even count)."""
    return max(2, min(MAX_DEFAULT_STATES, seq_len // 4) // 2 * 2)


def layer_fit(stu: nn.Module, state_dim: int | None = None, method: str | None = None) -> LDSFit:
    """The (cached) fit of `stu`'s filter bank: `state_dim` states (None: `default_state_dim`), by
    `method` (None: the library's best)."""
    kwargs = {"method": method} if method else {}
    states = state_dim or default_state_dim(stu.seq_len)
    return get_fit(stu.seq_len, stu.num_filters, states, stu.variant, **kwargs)


def distill_stu_layers(
    module: nn.Module,
    fit_for: Callable[[nn.Module], LDSFit] = layer_fit,
    max_fit_error: float | None = DEFAULT_MAX_FIT_ERROR,
) -> tuple[list[LayerReport], list[LDSFit]]:
    """Swap every STU layer of `module` for its LDS, in place; the measured report of each layer and
    the distinct fits used. `fit_for(stu)` is asked once per (seq_len, num_filters, variant); every
    layer is measured first and none is swapped if one misses by more than `max_fit_error`."""
    fits: dict[tuple, LDSFit] = {}

    def get(stu: nn.Module) -> LDSFit:
        key = (stu.seq_len, stu.num_filters, stu.variant)
        if key not in fits:
            fits[key] = fit_for(stu)
        return fits[key]

    reports = convert_stu_layers(module, get, max_error=max_fit_error)
    return reports, list(fits.values())


def distillation_table(
    reports: list[LayerReport], before: dict[str, float] | None = None, after: dict[str, float] | None = None
) -> str:
    """The swap's table: states and measured relative MSE per layer, then each metric in both models."""
    before, after = before or {}, after or {}
    lines = ["STU -> LDS distillation", f"{'layer':<28}{'states':>8}{'rel. MSE vs STU':>18}"]
    lines += [f"{r.path:<28}{r.state_dim:>8}{r.rel_mse:>18.3e}" for r in reports]
    for key in sorted(set(before) & set(after)):
        lines.append(f"{key:<28} STU {before[key]:.4f}   LDS {after[key]:.4f}")
    return "\n".join(lines)
