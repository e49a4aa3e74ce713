"""`spectralds distill-filters` (fit an LDS to the filters) and `spectralds import-fit` (a released fit file,
aligned to our filters and measured): the commands that write LDS fit files."""

from __future__ import annotations

from spectralds.cli_errors import CommandParser
from spectralds.io import check_output_path


def import_fit_main(argv: list[str]) -> None:
    """Entry point of the `import-fit` subcommand (argv without the subcommand name)."""
    from spectralds.distill import save_fit
    from spectralds.distill.released import import_released

    p = CommandParser(
        "spectralds import-fit",
        "Read a released Flash STU 2 / SpectraLDS LDS fit (torch file with A, B, C), align its "
        "filter columns to ours (order and signs), measure it against our filters and write our format.",
    )
    p.add_argument("file", help="the released fit, e.g. phi_lds.pt or 80_phi_lds.pt")
    p.add_argument("--seq-len", type=int, default=8192, help="filter length L")
    p.add_argument("--num-filters", type=int, default=24, help="K (the file holds 2K filters)")
    p.add_argument("--variant", default="hankel", help="filter family")
    p.add_argument("--out", required=True, help="output .safetensors file")
    a = p.parse_args(argv)
    check_output_path(a.out, make_parents=True)  # before the work, not after it
    fit, order, flipped = import_released(a.file, a.seq_len, a.num_filters, a.variant)
    save_fit(fit, a.out)
    print(
        f"wrote {a.out}: {fit.state_dim} states (filter columns {order}, {flipped} of {2 * fit.num_filters} "
        f"signs flipped), relative MSE float64 {fit.rel_mse_f64:.3e}, float32 {fit.rel_mse_f32:.3e}, "
        f"worst filter {max(fit.rel_mse_f64_per_filter):.3e}, cancellation {fit.cancellation:.2e}"
    )


def distill_filters_main(argv: list[str]) -> None:
    from spectralds.distill import fit_filters, save_fit

    p = CommandParser("spectralds distill-filters", "Fit one diagonal LDS to the 2K spectral filters.")
    p.add_argument("--seq-len", type=int, default=8192, help="filter length L")
    p.add_argument("--num-filters", type=int, default=24, help="K: the fit covers the 2K filters")
    p.add_argument("--state-dim", type=int, default=80, help="LDS states")
    p.add_argument("--variant", default="hankel", help="filter family")
    p.add_argument("--method", default=None, help="fit method (None: the library's best)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    check_output_path(a.out, make_parents=True)  # before the fit, not after it
    kwargs = {"method": a.method} if a.method else {}
    fit = fit_filters(
        a.seq_len, a.num_filters, a.state_dim, variant=a.variant, progress=not a.no_progress, **kwargs
    )
    save_fit(fit, a.out)
    print(
        f"wrote {a.out}: {fit.state_dim} states, relative MSE float64 {fit.rel_mse_f64:.3e}, "
        f"float32 {fit.rel_mse_f32:.3e}, worst filter {max(fit.rel_mse_f64_per_filter):.3e}"
    )
