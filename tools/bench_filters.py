"""Benchmark spectral filter solvers: time vs sequence length, and accuracy of Lanczos against eigh.

    python tools/bench_filters.py                          # L = 1024 ... 2^20, K = 24, both variants
    python tools/bench_filters.py --lengths 1024 4096 --json out.json --plot out.png

Every timing is from scratch (``use_cache=False``). The accuracy is the relative MSE
sum (a - b)^2 / sum b^2 of the Lanczos filters ``a`` against the dense-eigh filters ``b``, over the whole
bank and per filter (worst). ``floor`` columns compare eigh with eigh of the reversed matrix J Z J (whose
eigenvectors are J v): two equally valid float64 computations, so their disagreement is the accuracy
float64 itself allows; no solver can agree with eigh better than that, filter by filter.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from spectralds.filters import _cache_path, hankel_matrix, spectral_filters


def rel_mse(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(whole bank, worst single filter) relative MSE of a against b."""
    per_filter = ((a - b) ** 2).sum(0) / (b**2).sum(0)
    return float(((a - b) ** 2).sum() / (b**2).sum()), float(per_filter.max())


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def canonical_sign(x: torch.Tensor) -> torch.Tensor:
    peak = x.gather(0, x.abs().argmax(dim=0, keepdim=True))
    return x * torch.where(peak < 0, -1.0, 1.0).to(x.dtype)


def reversed_eigh_filters(seq_len: int, k: int, variant: str) -> torch.Tensor:
    flip = torch.arange(seq_len - 1, -1, -1)
    evals, evecs = torch.linalg.eigh(hankel_matrix(seq_len, variant)[flip][:, flip])
    evals, evecs = evals.flip(0)[:k], evecs.flip(1)[:, :k][flip]
    return canonical_sign(evecs) * evals.clamp_min(0) ** 0.25


def bench_one(seq_len: int, k: int, variant: str, args: argparse.Namespace) -> dict:
    row: dict = {"variant": variant, "seq_len": seq_len, "num_filters": k}
    fast = None
    try:
        fast, row["lanczos_s"] = timed(
            lambda: spectral_filters(seq_len, k, variant, method="lanczos", use_cache=False), args.repeats
        )
    except ValueError as err:  # more filters asked than float64 resolves at this length
        row["lanczos_error"] = str(err)
        _, row["auto_s"] = timed(lambda: spectral_filters(seq_len, k, variant, use_cache=False), 1)
    if seq_len <= args.eigh_max:
        cached = args.eigh_cache and _cache_path(seq_len, k, variant, "eigh").exists()
        ref, eigh_s = timed(
            lambda: spectral_filters(seq_len, k, variant, method="eigh", use_cache=args.eigh_cache), 1
        )
        if not cached:  # a time only for a real computation
            row["eigh_s"] = eigh_s
        if fast is not None:
            row["rel_mse"], row["worst_filter_rel_mse"] = rel_mse(fast, ref)
        if seq_len <= args.floor_max:
            floor = reversed_eigh_filters(seq_len, k, variant)
            row["floor_rel_mse"], row["floor_worst_filter_rel_mse"] = rel_mse(floor, ref)
            row["per_filter_floor"] = (((floor - ref) ** 2).sum(0) / (ref**2).sum(0)).tolist()
        if fast is not None:
            row["per_filter"] = (((fast - ref) ** 2).sum(0) / (ref**2).sum(0)).tolist()
    return row


def fmt(row: dict, key: str, spec: str) -> str:
    return format(row[key], spec) if key in row else "-"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant in sorted({r["variant"] for r in rows}):
        rs = [r for r in rows if r["variant"] == variant]
        for key, style in (("lanczos_s", "o-"), ("eigh_s", "s--")):
            pts = [(r["seq_len"], r[key]) for r in rs if key in r]
            if pts:
                ax_t.plot(*zip(*pts, strict=True), style, label=f"{variant} {key[:-2]}")
        with_err = [r for r in rs if "per_filter" in r]
        if with_err:
            r = with_err[-1]
            ax_e.semilogy(r["per_filter"], "o-", label=f"{variant} L={r['seq_len']}: lanczos vs eigh")
            if "per_filter_floor" in r:
                ax_e.semilogy(r["per_filter_floor"], "x:", label=f"{variant}: eigh vs eigh(JZJ)")
    ax_t.set(xscale="log", yscale="log", xlabel="seq_len", ylabel="seconds", title="time (no cache)")
    ax_e.axhline(1e-15, color="gray", lw=0.8)
    ax_e.set(xlabel="filter index (descending eigenvalue)", ylabel="relative MSE", title="per-filter error")
    for ax in (ax_t, ax_e):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192, 65536, 1 << 20])
    parser.add_argument("--num-filters", type=int, default=24)
    parser.add_argument("--variants", nargs="+", default=["hankel", "hankel_L"])
    parser.add_argument("--eigh-max", type=int, default=8192, help="largest L timed with dense eigh")
    parser.add_argument("--floor-max", type=int, default=8192, help="largest L for the eigh-vs-eigh floor")
    parser.add_argument("--repeats", type=int, default=1, help="Lanczos timings: median of this many runs")
    parser.add_argument("--eigh-cache", action="store_true", help="keep/reuse eigh references in the cache")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write the records to this path")
    parser.add_argument("--plot", default="bench_filters.png", help="PNG path ('' for none)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"{'variant':9} {'L':>8} {'K':>3} {'lanczos s':>10} {'eigh s':>8} {'relMSE':>8} {'worst/filt':>10}"
        f" {'floor':>8} {'floor worst':>11}"
    )
    rows = []
    for variant in args.variants:
        for seq_len in args.lengths:
            row = bench_one(seq_len, args.num_filters, variant, args)
            rows.append(row)
            fast = fmt(row, "lanczos_s", "10.3f") if "lanczos_s" in row else f"{'n/a':>10}"
            cells = [
                f"{variant:9} {seq_len:>8} {args.num_filters:>3} {fast} {fmt(row, 'eigh_s', '8.2f'):>8}",
                f"{fmt(row, 'rel_mse', '8.1e'):>8} {fmt(row, 'worst_filter_rel_mse', '10.1e'):>10}",
                f"{fmt(row, 'floor_rel_mse', '8.1e'):>8}",
                f"{fmt(row, 'floor_worst_filter_rel_mse', '11.1e'):>11}",
            ]
            print(" ".join(cells), flush=True)
            if "lanczos_error" in row:
                print(f"    lanczos: {row['lanczos_error']}")
                print(f"    method='auto' falls back to eigh: {row['auto_s']:.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot:
        plot(rows, args.plot)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
