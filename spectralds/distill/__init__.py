"""Distillation: spectral filters -> diagonal LDS (fit), STU layers -> LDS layers, state pruning."""

from spectralds.distill.cache import fit_cache_path, get_fit
from spectralds.distill.fit import (
    FIT_METHODS,
    LDSFit,
    cancellation_factor,
    fit_filters,
    float32_check,
    float32_recurrence,
    hankel_singular_values,
    relative_mse,
    target_filters,
)
from spectralds.distill.lds_file import load_fit, predicted_float32_error, read_fit, save_fit

# A system's impulse response in float64 (the one reference, `ops.lds_conv.impulse_response_ref`).
from spectralds.ops.lds_conv import impulse_response_ref as impulse_response

__all__ = [
    "FIT_METHODS",
    "LDSFit",
    "cancellation_factor",
    "fit_filters",
    "float32_check",
    "float32_recurrence",
    "fit_cache_path",
    "get_fit",
    "hankel_singular_values",
    "impulse_response",
    "load_fit",
    "predicted_float32_error",
    "read_fit",
    "relative_mse",
    "save_fit",
    "target_filters",
]
