"""The smallest LDS state dim that reaches a float64 error target, over a grid of shapes (L, K).

    python tools/distill_table.py --json tools/distill_table.json --md tools/distill_table.md
    python tools/distill_table.py --quick                    # tiny sizes, a smoke test (seconds)
    python tools/distill_table.py --seq-lens 8192 --num-filters 24 --targets 1e-12 --plot table.png

For each (L, K): the K "hankel" filters by Lanczos (float64; timed on its own, uncached), then the
smallest even state dim h (mirrored or joint layout, whichever `fit_filters` keeps) whose float64
impulse response reaches relative MSE <= each target against the 2K target filters (+ and - branch).
At that h: the float32 recurrence error from the fit's metadata (a plain float32 loop on a fixed-seed
Gaussian input against the exact float64 convolution) and the seconds of that one `fit_filters` call,
filters excluded (they are passed in; "filters s" is their own time, so end to end is the sum).

The search is cheap and assumes the error falls with h near the answer: the first h comes from the
Hankel singular values (error ~ c * (sigma_(h+1) / sigma_1)^2, c calibrated on the fits so far), the
next target's from the cell's own log-linear error curve, then steps up (4, 4, 4, 8, 16 ...) or down
(4, 8, 16 ...) until the target is bracketed, then bisection on even h. Every reported h has a fit at
h - 2 that misses the target (or h = 2). Up to `--cap` states (and L/4, the fit's own limit). Far
above the needed h the fit's error is not monotone (measured at L=4096, K=25: h=72 3e-19, h=80 7e-16,
h=110..144 ~5e-16, h=146 1e-19), hence short steps up; such evaluations are listed in the output.

K beyond what float64 resolves at L (the filters module's own count: Lanczos refuses filters with
sigma_k < RESOLUTION * sigma_1) is not fitted: filters n+1..K are rounding noise (solvers disagree by
1e-6 up to 100% per filter) and hold up to the "noise share" of the bank's energy, far above 1e-12,
so a K-filter target at 1e-12 would measure agreement with one solver's noise. What is meaningful is
the fit of the n resolvable filters (the (L, n) problem): those cells show it, marked "[n=..]".
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _bench_common import machine_info, write_json  # noqa: E402

from spectralds.distill import fit_filters, hankel_singular_values, target_filters  # noqa: E402
from spectralds.filters import RESOLUTION, spectral_filters  # noqa: E402

SEQ_LENS, NUM_FILTERS, TARGETS = (1024, 4096, 8192, 32768), (8, 16, 24, 32), (1e-12, 1e-16)
QUICK = {"seq_lens": (128, 256), "num_filters": (4, 24), "cap": 64}


# ---- the search -----------------------------------------------------------------------------------
def _bounds(errors: dict[int, float], target: float) -> tuple[int, int | None]:
    """(largest failing h below the smallest reaching one or 0, smallest reaching h or None)."""
    hi = min((h for h, e in errors.items() if e <= target), default=None)
    lo = max((h for h, e in errors.items() if e > target and (hi is None or h < hi)), default=0)
    return lo, hi


def smallest_state_dim(
    evaluate: Callable[[int], float], errors: dict[int, float], target: float, guess: int, cap: int
) -> int | None:
    """The smallest even h <= cap with evaluate(h) <= target, assuming the error falls with h.

    `errors` (h -> error) holds the evaluations so far and receives the new ones, so one cell's
    targets share their fits. Returns None when even h = cap misses the target.
    """
    cap -= cap % 2
    h, step, last_move, ups = max(2, min(cap, guess + guess % 2)), 4, 0, 0
    while True:
        lo, hi = _bounds(errors, target)
        if hi is not None and hi - lo <= 2:
            return hi
        if hi is None and lo >= cap:
            return None
        if not lo < h < (hi if hi is not None else cap + 1) or h in errors:  # pick the next h
            move = 1 if hi is None else -1 if lo == 0 else 0
            step = step * 2 if move == last_move and move else 4
            last_move, ups = move, ups + (move > 0)
            if move > 0:
                # Up: three steps of 4 before doubling. Fits far above the needed h can stall (the error
                # is not monotone there), and a long jump up would bisect among them.
                step = 4 if ups <= 3 else step
                h = min(cap, lo + step)
            elif move < 0:
                h = max(2, hi - step)
            else:
                h = lo + 2 * ((hi - lo) // 4)  # the even midpoint
        errors[h] = evaluate(h)


def extrapolated_guess(errors: dict[int, float], h: int, target: float) -> int | None:
    """The h reaching `target` on the log-linear line through the fits at h - 2 and h (None if flat)."""
    if h - 2 not in errors or not errors[h - 2] > errors[h] > 0:
        return None
    decades_per_state = math.log10(errors[h - 2] / errors[h]) / 2
    return h + max(0, math.ceil(math.log10(errors[h] / target) / decades_per_state))


def hsv_guess(hsv: list[float], target: float, calibration: float) -> int:
    """The smallest h with calibration * (sigma_(h+1) / sigma_1)^2 <= target (hsv[h] = sigma_(h+1))."""
    for h in range(2, len(hsv)):
        if calibration * hsv[h] ** 2 <= target:
            return h
    return len(hsv)


# ---- one cell ---------------------------------------------------------------------------------------
def lanczos_filters(seq_len: int, num_filters: int, variant: str) -> tuple[torch.Tensor | None, int, float]:
    """(filters or None, resolvable count, seconds): Lanczos, uncached, so the time is a real compute.

    The count is the filters module's own: its Lanczos raises "only n of K ... resolvable" when some of
    the K filters are below its RESOLUTION.
    """
    start = time.perf_counter()
    try:
        phi = spectral_filters(seq_len, num_filters, variant, method="lanczos", use_cache=False)
    except ValueError as err:
        match = re.search(r"only (\d+) of \d+ .* resolvable", str(err))
        if match is None:
            raise
        return None, int(match.group(1)), time.perf_counter() - start
    return phi, num_filters, time.perf_counter() - start


def fit_record(seq_len: int, num_filters: int, h: int, phi: torch.Tensor, variant: str) -> dict:
    start = time.perf_counter()
    fit = fit_filters(seq_len, num_filters, h, variant, progress=False, filters=phi)
    seconds = time.perf_counter() - start
    mirrored = h % 2 == 0 and bool(torch.equal(fit.A[h // 2 :], -fit.A[: h // 2]))
    return {"state_dim": h, "f64": fit.rel_mse_f64, "f64_worst": max(fit.rel_mse_f64_per_filter),
            "f32": fit.rel_mse_f32, "layout": "mirrored" if mirrored else "joint", "fit_s": seconds}


class Table:
    """Runs the cells, sharing filters and fits between cells that fit the same (L, K)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.calibration = 1.0  # error / (sigma_(h+1)/sigma_1)^2 at the last found h (log scale update)
        self.solved: dict[tuple[int, int], dict] = {}

    def fit_bank(self, seq_len: int, num_filters: int, phi: torch.Tensor, filter_s: float) -> dict:
        """Search each target for the (L, K) bank `phi`; the evaluations are kept in the record."""
        key = (seq_len, num_filters)
        if key in self.solved:
            return self.solved[key]
        args, start = self.args, time.perf_counter()
        cap = min(args.cap, seq_len // 4)
        hsv = hankel_singular_values(target_filters(phi), cap + 2).tolist()
        evaluations: dict[int, dict] = {}

        def evaluate(h: int) -> float:
            evaluations[h] = fit_record(seq_len, num_filters, h, phi, args.variant)
            r = evaluations[h]
            print(f"    L={seq_len} K={num_filters} h={h}: float64 {r['f64']:.2e}, float32 {r['f32']:.2e}, "
                  f"{r['layout']}, {r['fit_s']:.1f} s", flush=True)
            return r["f64"]

        errors: dict[int, float] = {}
        results, h = {}, None
        for target in args.targets:
            # the first target from the Hankel singular values; the next ones from this cell's own
            # error curve: the singular values floor (float64 filters) well above the errors of 1e-16
            guess = None if h is None else extrapolated_guess(errors, h, target)
            guess = hsv_guess(hsv, target, self.calibration) if guess is None else guess
            h = smallest_state_dim(evaluate, errors, target, guess, cap)
            if h is None:
                best = min(evaluations.values(), key=lambda r: r["f64"])
                results[f"{target:g}"] = {"reached": False, "cap": cap, "guess": guess, "best": best}
                continue
            results[f"{target:g}"] = {"reached": True, "guess": guess, **evaluations[h]}
            if h < len(hsv) and hsv[h] > 0:  # half-way in log to the measured ratio: robust to one outlier
                ratio = evaluations[h]["f64"] / hsv[h] ** 2
                self.calibration = math.sqrt(self.calibration * ratio)
        # a fit with more states and a much larger error than one with fewer: the error is not monotone
        pairs = [(a, b) for a in evaluations.values() for b in evaluations.values()
                 if b["state_dim"] > a["state_dim"] and b["f64"] > 10 * a["f64"]]
        worst = max(pairs, key=lambda p: p[1]["f64"] / p[0]["f64"], default=None)
        record = {"non_monotone": None if worst is None else {
                      "h": worst[0]["state_dim"], "f64": worst[0]["f64"],
                      "larger_h": worst[1]["state_dim"], "larger_h_f64": worst[1]["f64"]},
                  "filters_fitted": num_filters, "filter_s": filter_s, "targets": results,
                  "search_s": time.perf_counter() - start, "num_fits": len(evaluations),
                  "evaluations": [evaluations[h] for h in sorted(evaluations)],
                  "hsv_sq": {h: hsv[h] ** 2 for h in sorted(evaluations) if h < len(hsv)}}
        self.solved[key] = record
        return record

    def cell(self, seq_len: int, num_filters: int) -> dict:
        variant = self.args.variant
        phi, resolvable, filter_s = lanczos_filters(seq_len, num_filters, variant)
        cell = {"seq_len": seq_len, "num_filters": num_filters, "resolvable": resolvable}
        if phi is None:  # the meaningful part: the n resolvable filters, i.e. the (L, n) problem
            phi, _, filter_s = lanczos_filters(seq_len, resolvable, variant)
            energy = phi.square().sum(0)  # ||phi_k||^2 = sigma_k^(1/2)
            # filters n+1..K have sigma_k < RESOLUTION sigma_1: their share of the K-bank's energy is below
            cell["noise_share_bound"] = float((num_filters - resolvable) * math.sqrt(RESOLUTION) * energy[0]
                                              / energy.sum())
            print(f"  L={seq_len} K={num_filters}: only {resolvable} filters resolvable; fitting those",
                  flush=True)
        return {**cell, **self.fit_bank(seq_len, phi.shape[1], phi, filter_s)}


# ---- output -----------------------------------------------------------------------------------------
def _target_cells(cell: dict, target: float) -> list[str]:
    """h, float64, float32, fit s for one target; the n-filter fit of an unresolvable cell in [ ]."""
    r = cell["targets"][f"{target:g}"]
    if not r["reached"]:
        best = r["best"]
        cells = [f"not reached by h<={r['cap']}", f"best {best['f64']:.1e} (h={best['state_dim']})",
                 f"{best['f32']:.1e}", f"{best['fit_s']:.1f}"]
    else:
        cells = [str(r["state_dim"]), f"{r['f64']:.1e}", f"{r['f32']:.1e}", f"{r['fit_s']:.1f}"]
    if cell["resolvable"] < cell["num_filters"]:
        cells = [f"[{c}]" for c in cells]
    return cells


def markdown(cells: list[dict], args: argparse.Namespace, total_s: float) -> str:
    targets = args.targets
    head = ["L", "K", "filters (s)"]
    for t in targets:
        head += [f"h @ {t:g}", "float64", "float32", "fit s"]
    head += ["fits", "search s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        n, K = c["resolvable"], c["num_filters"]
        what = f"{K} ({c['filter_s']:.1f})"
        if n < K:
            what = f"K > resolvable ({n}) [n={n}: {c['filter_s']:.1f}]"
        row = [str(c["seq_len"]), str(K), what]
        for t in targets:
            row += _target_cells(c, t)
        row += [str(c["num_fits"]), f"{c['search_s']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")

    pivot = ["| L \\ K | " + " | ".join(str(k) for k in args.num_filters) + " |",
             "|" + "---|" * (len(args.num_filters) + 1)]
    for L in args.seq_lens:
        row = [str(L)]
        for K in args.num_filters:
            c = next(c for c in cells if c["seq_len"] == L and c["num_filters"] == K)
            hs = [str(r["state_dim"]) if r["reached"] else f">{r['cap']}"
                  for r in (c["targets"][f"{t:g}"] for t in targets)]
            hs = " / ".join(hs)
            row.append(hs if c["resolvable"] >= K else f"K > resolvable ({c['resolvable']}): [{hs}]")
        pivot.append("| " + " | ".join(row) + " |")

    unresolved = [c for c in cells if c["resolvable"] < c["num_filters"]]
    stalls = {(c["seq_len"], c["filters_fitted"]): c["non_monotone"] for c in cells if c["non_monotone"]}
    info = machine_info("cpu")
    notes = [
        f"# Smallest LDS state dim per (L, K), variant {args.variant!r}, fit method 'varpro'",
        "",
        f"Machine: {info['cpu']} ({info['cores']} cores, shared; fits run on 1 thread), "
        f"torch {info['torch']}. "
        f"Total run time {total_s / 60:.1f} min.",
        "",
        "h = the smallest even state dim (real diagonal states) whose float64 impulse response reaches "
        "relative MSE <= the target against the 2K target filters (K filters and their (-1)^t mirrors), "
        "for the system `fit_filters` keeps (mirrored A = [a, -a] unless the joint fit halves the float32 "
        "error: a choice made for float32, so the float64 error is not always the lowest it could be). "
        "float32 = the fit's own float32 check at that h (a plain float32 recurrence on a fixed-seed "
        "Gaussian input vs the exact float64 convolution), fit s = that one fit_filters call with the "
        "filters passed in; filters (s) = Lanczos filters computed uncached (end to end = the sum). "
        "search s / fits = the whole search for the cell. Timings are single runs on a shared machine.",
        "",
        f"State dims, h @ {' / '.join(f'{t:g}' for t in targets)}:",
        "",
        *pivot,
        "",
    ]
    notes += ["Details:", ""] + lines + [""]
    if unresolved:
        shares = ", ".join(f"L={c['seq_len']} K={c['num_filters']}: < {c['noise_share_bound']:.0e}"
                           for c in unresolved)
        notes += [
            "**K > resolvable (n)**: at this L, float64 determines only the top n filters (the filters "
            "module's Lanczos refuses sigma_k < 1e-13 sigma_1). Filters n+1..K are rounding noise "
            "(float64 solvers disagree by 1e-6 up to 100% per filter) holding a share of the K-bank's "
            f"energy up to ({shares}), far above 1e-12: a 1e-12 or 1e-16 target over all K filters "
            "would measure agreement with one solver's noise, so those cells fit nothing to the K "
            "filters. Bracketed numbers are the meaningful part, the fit of the n resolvable filters "
            "(the (L, n) problem). Used for K filters (outputs n+1..K left at zero), such a system is off "
            "the K-bank by about the noise share, and an STU loses little: those filters enter with "
            "weights sigma_k^(1/4) < 6e-4 sigma_1^(1/4).",
            "",
        ]
    if stalls:
        worst = "; ".join(f"L={L} K={K}: h={m['larger_h']} gave {m['larger_h_f64']:.1e} but h={m['h']} "
                          f"{m['f64']:.1e}" for (L, K), m in stalls.items())
        notes += [
            f"**Not monotone**: the fit error does not always fall with h ({worst}). The search only "
            "assumes it near the answer (the fit at h - 2 always misses); the evaluations are in the JSON.",
            "",
        ]
    return "\n".join(notes)


def plot(path: str, cells: list[dict], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.targets), figsize=(5.5 * len(args.targets), 4.2), squeeze=False)
    for ax, target in zip(axes[0], args.targets, strict=True):
        for L in args.seq_lens:
            rows = [c for c in cells if c["seq_len"] == L]
            pts = [(c["filters_fitted"], c["targets"][f"{target:g}"]) for c in rows]
            pts = sorted({k: r["state_dim"] for k, r in pts if r["reached"]}.items())
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", label=f"L={L}")
        ax.set(xlabel="filters fitted (K, or the resolvable n)", ylabel="smallest state dim h",
               title=f"float64 relative MSE <= {target:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=list(SEQ_LENS))
    p.add_argument("--num-filters", type=int, nargs="+", default=list(NUM_FILTERS))
    p.add_argument("--targets", type=float, nargs="+", default=list(TARGETS), help="float64 relative MSEs")
    p.add_argument("--cap", type=int, default=200, help="largest state dim searched (also <= L/4)")
    p.add_argument("--variant", default="hankel", choices=["hankel", "hankel_L"])
    p.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    p.add_argument("--json", default=None, help="write the records to this path")
    p.add_argument("--md", default=None, help="write the markdown table and notes to this path")
    p.add_argument("--plot", default=None, help="write a PNG of h against K per L")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, list(value) if isinstance(value, tuple) else value)
    args.targets = sorted(args.targets, reverse=True)  # looser first: its fits seed the next search
    args.device = "cpu"  # for write_json's machine info
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine_info("cpu").items()), flush=True)

    start, table, cells = time.perf_counter(), Table(args), []
    for L in args.seq_lens:
        for K in args.num_filters:
            cells.append(table.cell(L, K))
    total = time.perf_counter() - start
    text = markdown(cells, args, total)
    print(text)
    if args.json:
        write_json(args.json, cells, args)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
        print(f"markdown written to {args.md}")
    if args.plot:
        plot(args.plot, cells, args)
    return cells


if __name__ == "__main__":
    main()
