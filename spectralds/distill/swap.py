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

# Relative MSE above which a converted layer refuses the swap: its impulse response, its output on a probe,
# or its decoding in its run dtype (`spectralds.distill.run_precision`), the worst of the three.
DEFAULT_MAX_FIT_ERROR = 1e-6
# The default states: at most seq_len // 4 (a fit needs several samples per state), and at most 48 below
# LONG_CONTEXT, 80 from there. Measured (K=24, relative MSE, float64 fit / float32 decoding vs the layer's
# forward, one probe layer): L=256 h=48 5.8e-11 / 4.6e-8, but h=64 2.5e-13 / 1.0e-7 (the float64-best
# fit: 1.4e-4); L=512 h=48 6.2e-10 / 7.1e-9, h=80 1.1e-14 / 4.3e-7; L=1024 h=80 2.5e-16 / 9.7e-9;
# L=8192 h=80 7.2e-21 / 5.3e-11. More states per sample cancel more in the readout: float32 rounding.
MAX_DEFAULT_STATES = 80
SHORT_CONTEXT_STATES = 48
LONG_CONTEXT = 1024
STATE_DIM_RULE = (f"min(seq_len // 4, {SHORT_CONTEXT_STATES} below seq_len {LONG_CONTEXT}, "
                  f"else {MAX_DEFAULT_STATES}), even")  # for help texts


def default_state_dim(seq_len: int) -> int:
    """The states of a layer's fit when none are asked for: `STATE_DIM_RULE` (a fit needs several
    samples per state, float32 decoding few states per sample, and the mirrored fit an even count)."""
    cap = SHORT_CONTEXT_STATES if seq_len < LONG_CONTEXT else MAX_DEFAULT_STATES
    return max(2, min(cap, seq_len // 4) // 2 * 2)


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
    """The swap's table: states and the measured relative MSEs per layer (LDS vs STU output on the probe;
    the LDS's decoding in its run dtype vs its float64 forward), then each metric in both models."""
    before, after = before or {}, after or {}
    run = "/".join(sorted({r.run_dtype for r in reports})) or "float32"
    lines = ["STU -> LDS distillation (relative MSE)",
             f"{'layer':<28}{'states':>8}{'LDS vs STU':>14}{run + ' decode vs fwd':>24}"]
    lines += [f"{r.path:<28}{r.state_dim:>8}{r.rel_mse:>14.3e}{r.run_rel_mse:>24.3e}" for r in reports]
    for key in sorted(set(before) & set(after)):
        lines.append(f"{key:<28} STU {before[key]:.4f}   LDS {after[key]:.4f}")
    return "\n".join(lines)
