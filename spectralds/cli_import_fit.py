"""`spectralds import-fit`: a released LDS fit file (.pt) -> our fit format, measured against our filters."""

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
    check_output_path(a.out)  # before the work, not after it
    fit, order, flipped = import_released(a.file, a.seq_len, a.num_filters, a.variant)
    save_fit(fit, a.out)
    print(
        f"wrote {a.out}: {fit.state_dim} states (filter columns {order}, {flipped} of {2 * fit.num_filters} "
        f"signs flipped), relative MSE float64 {fit.rel_mse_f64:.3e}, float32 {fit.rel_mse_f32:.3e}, "
        f"worst filter {max(fit.rel_mse_f64_per_filter):.3e}, cancellation {fit.cancellation:.2e}"
    )
