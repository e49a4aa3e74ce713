"""Benchmark the filter -> LDS fits: error against state dimension, float64 and float32, and fit time.

    python tools/bench_distill.py                                  # L=8192, K=24, h = 40 ... 160
    python tools/bench_distill.py --seq-len 1024 --num-filters 8 --state-dims 16 24 32 --no-end-to-end
    python tools/bench_distill.py --json distill.json --plot distill.png
    python tools/bench_distill.py --score phi_lds.pt 80_phi_lds.pt fit.safetensors   # score fit files

For each method and state dim h: relative MSE of the float64 impulse response against the 2K filters
(overall and worst filter), relative MSE of a plain float32 recurrence on a fixed-seed Gaussian input
against the exact float64 convolution, max |a|, the cancellation factor max_k sum_j |B_j C_jk| / max_t
|phi_k(t)|, whether the fit kept the mirrored layout (A = [a, -a]) or the joint one, and the fit time
(filters precomputed, one run: timings on a busy machine are noisy). Also the estimated Hankel singular
values of the 2K-filter bank, sigma_h / sigma_1 (the best h-state fit has error ~ sigma_(h+1)^2), and
the end-to-end time of fit_filters(L, K, 80) from scratch (filters included, computed into an empty
cache directory).

``--score FILE...`` measures fit files against our filters (L, K from --seq-len/--num-filters): ours
(.safetensors, re-measured, not the stored numbers) and released ones (torch files, through the
importer, which aligns their column order and signs). Without --state-dims it runs no fits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _bench_common import format_table, machine_info  # noqa: E402

from spectralds.distill import (  # noqa: E402
    FIT_METHODS,
    fit_filters,
    hankel_singular_values,
    load_fit,
    target_filters,
)
from spectralds.distill.released import import_released, measure  # noqa: E402
from spectralds.filters import spectral_filters  # noqa: E402


def is_mirrored(A: torch.Tensor, C: torch.Tensor) -> bool:
    n, K = A.shape[0] // 2, C.shape[1] // 2
    if A.shape[0] % 2:
        return False
    return bool(torch.equal(A[n:], -A[:n]) and (C[:n, K:] == 0).all() and (C[n:, :K] == 0).all())


def run_fits(args: argparse.Namespace, phi: torch.Tensor) -> list[dict]:
    records = []
    for method in args.methods:
        for h in args.state_dims:
            start = time.perf_counter()
            fit = fit_filters(
                args.seq_len, args.num_filters, h, args.variant, method, progress=False, filters=phi
            )
            records.append({
                "method": method, "state_dim": h, "f64": fit.rel_mse_f64,
                "f64_worst": max(fit.rel_mse_f64_per_filter), "f32": fit.rel_mse_f32,
                "max_abs_a": float(fit.A.abs().max()), "cancellation": fit.cancellation,
                "layout": "mirrored" if is_mirrored(fit.A, fit.C) else "joint",
                "seconds": time.perf_counter() - start,
            })
            seconds = records[-1]["seconds"]
            print(f"  {method} h={h}: float64 {fit.rel_mse_f64:.2e} ({seconds:.1f} s)", flush=True)
    return records


COLUMNS = [
    ("method", "method", ""), ("h", "state_dim", "d"), ("f64 rel MSE", "f64", ".2e"),
    ("f64 worst filter", "f64_worst", ".2e"), ("f32 rel MSE", "f32", ".2e"), ("max|a|", "max_abs_a", ".8f"),
    ("cancellation", "cancellation", ".2e"), ("layout", "layout", ""), ("fit s", "seconds", ".2f"),
]


def score(args: argparse.Namespace, phi: torch.Tensor) -> list[dict]:
    """Measured errors of each fit file against our filters (never the numbers stored in a file)."""
    records = []
    for path in args.score:
        if path.endswith(".safetensors"):
            fit = load_fit(path, args.seq_len, args.num_filters, args.variant)
            fit, note = measure(fit.A, fit.B, fit.C, args.seq_len, args.num_filters, args.variant,
                                fit.method, phi), "ours"
        else:
            fit, order, flipped = import_released(path, args.seq_len, args.num_filters, args.variant, phi)
            note = f"released: columns {order}, {flipped} signs flipped"
        records.append({
            "name": os.path.basename(path), "state_dim": fit.state_dim, "f64": fit.rel_mse_f64,
            "f64_worst": max(fit.rel_mse_f64_per_filter), "f32": fit.rel_mse_f32,
            "f32_worst": max(fit.rel_mse_f32_per_filter), "cancellation": fit.cancellation, "note": note,
        })
    return records


SCORE_COLUMNS = [
    ("file", "name", ""), ("h", "state_dim", "d"), ("f64 rel MSE", "f64", ".2e"),
    ("f64 worst filter", "f64_worst", ".2e"), ("f32 rel MSE", "f32", ".2e"),
    ("f32 worst filter", "f32_worst", ".2e"), ("cancellation", "cancellation", ".2e"), ("", "note", ""),
]


def end_to_end(args: argparse.Namespace, state_dim: int = 80) -> float:
    """Seconds of fit_filters from scratch: the filters are computed into an empty cache directory."""
    saved = os.environ.get("SPECTRALDS_CACHE_DIR")
    with tempfile.TemporaryDirectory() as empty:
        os.environ["SPECTRALDS_CACHE_DIR"] = empty
        try:
            start = time.perf_counter()
            fit = fit_filters(args.seq_len, args.num_filters, state_dim, args.variant, progress=False)
            seconds = time.perf_counter() - start
        finally:
            if saved is None:
                del os.environ["SPECTRALDS_CACHE_DIR"]
            else:
                os.environ["SPECTRALDS_CACHE_DIR"] = saved
    worst = max(fit.rel_mse_f64_per_filter)
    print(f"end to end: fit_filters({args.seq_len}, {args.num_filters}, {state_dim}) from scratch took "
          f"{seconds:.1f} s: float64 {fit.rel_mse_f64:.2e} (worst filter {worst:.2e}), "
          f"float32 {fit.rel_mse_f32:.2e}")
    return seconds


def plot(path: str, records: list[dict], scored: list[dict], hsv: list[float], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in records):
        rows = [r for r in records if r["method"] == method]
        x = [r["state_dim"] for r in rows]
        (line,) = ax.plot(x, [r["f64"] for r in rows], "o-", label=f"{method}: float64")
        f32 = [r["f32"] for r in rows]
        ax.plot(x, f32, "s--", color=line.get_color(), label=f"{method}: float32 recurrence")
    index = list(range(1, len(hsv)))
    ax.plot(index, [v**2 for v in hsv[1:]], ":", color="gray", label=r"$(\sigma_{h+1}/\sigma_1)^2$ (Hankel)")
    for i, ref in enumerate(scored):
        marker, name = "*P^vDX"[i % 6], ref["name"]
        ax.plot(ref["state_dim"], ref["f64"], marker, ms=11, ls="", label=f"{name} (float64)")
        ax.plot(ref["state_dim"], ref["f32"], marker, ms=11, ls="", mfc="none", label=f"{name} (float32)")
    ax.set(yscale="log", xlabel="state dim h", ylabel="relative MSE", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--num-filters", type=int, default=24)
    p.add_argument("--state-dims", type=int, nargs="+", default=None,
                   help="state dims to fit (default 40 ... 160; none with --score)")
    p.add_argument("--score", nargs="+", default=[], metavar="FILE",
                   help="fit files to measure against our filters: ours (.safetensors) or released (.pt)")
    p.add_argument("--methods", nargs="+", choices=FIT_METHODS, default=["spectralds", "varpro"])
    p.add_argument("--variant", default="hankel")
    p.add_argument("--filter-method", default="auto", help="spectral_filters method for the targets")
    p.add_argument("--no-end-to-end", action="store_true", help="skip the from-scratch timing")
    p.add_argument("--json", default=None, help="write the records to this path")
    p.add_argument("--plot", default=None, help="write the Pareto plot (PNG) to this path")
    args = p.parse_args()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine_info("cpu").items()), flush=True)

    start = time.perf_counter()
    phi = spectral_filters(args.seq_len, args.num_filters, args.variant, method=args.filter_method)
    print(f"filters ({args.filter_method}, cache allowed): {time.perf_counter() - start:.1f} s", flush=True)
    if args.state_dims is None:
        args.state_dims = [] if args.score else [40, 48, 56, 64, 72, 80, 96, 120, 160]
    hsv = hankel_singular_values(target_filters(phi), max(args.state_dims + [80]) + 2).tolist()
    print("Hankel singular values of the 2K-filter bank, sigma_h / sigma_1: "
          + ", ".join(f"{h}: {hsv[h]:.1e}" for h in sorted({*args.state_dims, 60, 80}) if h < len(hsv)))

    records = run_fits(args, phi)
    if records:
        print(format_table(records, COLUMNS))
    scored = score(args, phi)
    if scored:
        print(f"fit files measured against our filters (L={args.seq_len}, K={args.num_filters}):")
        print(format_table(scored, SCORE_COLUMNS))
    seconds = None if args.no_end_to_end or not records else end_to_end(args)

    if args.json:
        payload = {"machine": machine_info("cpu"), "args": vars(args), "records": records,
                   "hankel_singular_values": hsv, "scored": scored, "end_to_end_seconds": seconds}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"records written to {args.json}")
    if args.plot:
        title = f"LDS fits of the {2 * args.num_filters} filters, L={args.seq_len}"
        plot(args.plot, records, scored, hsv, title)


if __name__ == "__main__":
    main()
