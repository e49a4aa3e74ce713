"""`spectralds distill-filters` (fit an LDS to the filters) and `spectralds import-fit` (a released fit file,
aligned to our filters and measured): the commands that write LDS fit files."""

from __future__ import annotations

from typing import Literal

from spectralds.cli_signature import library_defaults
from spectralds.distill import FIT_METHODS, fit_filters
from spectralds.distill.released import import_released
from spectralds.distill.swap import (
    STATE_DIM_RULE,  # noqa: F401  (named in a help text)
    default_state_dim,
)
from spectralds.errors import UserError
from spectralds.filters import VARIANTS
from spectralds.io import check_output_path, same_file
from spectralds.layers.stu import SpectralConv

# The filter length of the reference models and of their released fits; the library has no default
# length (a layer's is its model's context).
REFERENCE_SEQ_LEN = 8192
FILTER_BANK_DEFAULTS = library_defaults(SpectralConv)
IMPORT_DEFAULTS = library_defaults(import_released)
FIT_DEFAULTS = library_defaults(fit_filters)


def import_fit(
    file: str,
    *,
    seq_len: int = REFERENCE_SEQ_LEN,
    num_filters: int = FILTER_BANK_DEFAULTS["num_filters"],
    variant: Literal[VARIANTS] = IMPORT_DEFAULTS["variant"],
    out: str,
) -> None:
    """Read a released Flash STU 2 / SpectraLDS LDS fit (torch file with A, B, C), align its filter columns
    to ours (order and signs), measure it against our filters and write our format.

    Args:
        file: the released fit, e.g. phi_lds.pt or 80_phi_lds.pt
        seq_len: filter length L
        num_filters: K (the file holds 2K filters)
        variant: filter family
        out: output .safetensors file
    """
    from spectralds.distill import save_fit

    check_output_path(out, make_parents=True)  # before the work, not after it
    if same_file(out, file):
        raise UserError(f"refusing to write {out}: it is the input fit file")
    fit, order, flipped = import_released(file, seq_len, num_filters, variant)
    save_fit(fit, out)
    print(
        f"wrote {out}: {fit.state_dim} states (filter columns {order}, {flipped} of {2 * fit.num_filters} "
        f"signs flipped), relative MSE float64 {fit.rel_mse_f64:.3e}, float32 {fit.rel_mse_f32:.3e}, "
        f"worst filter {max(fit.rel_mse_f64_per_filter):.3e}, cancellation {fit.cancellation:.2e}"
    )


def distill_filters(
    *,
    seq_len: int = REFERENCE_SEQ_LEN,
    num_filters: int = FILTER_BANK_DEFAULTS["num_filters"],
    state_dim: int | None = None,
    variant: Literal[VARIANTS] = FIT_DEFAULTS["variant"],
    method: Literal[FIT_METHODS] = FIT_DEFAULTS["method"],
    out: str,
    no_progress: bool = False,
) -> None:
    """Fit one diagonal LDS to the 2K spectral filters.

    Args:
        seq_len: filter length L
        num_filters: K: the fit covers the 2K filters
        state_dim: LDS states (None: {STATE_DIM_RULE}, as the distillation callback fits)
        variant: filter family
        method: fit method
        out: output .safetensors file
        no_progress: no progress bar
    """
    from spectralds.distill import save_fit

    check_output_path(out, make_parents=True)  # before the fit, not after it
    states = default_state_dim(seq_len) if state_dim is None else state_dim
    fit = fit_filters(seq_len, num_filters, states, variant=variant, method=method, progress=not no_progress)
    save_fit(fit, out)
    print(
        f"wrote {out}: {fit.state_dim} states, relative MSE float64 {fit.rel_mse_f64:.3e}, "
        f"float32 {fit.rel_mse_f32:.3e}, worst filter {max(fit.rel_mse_f64_per_filter):.3e}"
    )
