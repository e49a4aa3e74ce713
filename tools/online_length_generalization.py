"""Length generalization by the protocol of Marsden et al. (arXiv 2411.01035): asymmetric regret of an
online spectral-filtering learner with context L' ~ sqrt(T) on one long LDS stream.

    python tools/online_length_generalization.py --plot tools/results/cpu/online_length_generalization.png \
        --json runs/online_lg.json
    python tools/online_length_generalization.py --quick      # tiny, for smoke tests

For each horizon T (a power of two) and seed, one stream of T steps from a marginally stable symmetric
LDS with noise (`make_stream`). Every learner predicts y_t from features f_t, is charged (y_t - W f_t)^2,
then takes one online gradient step (AdaGrad-norm step size, `online_loss`). Features (all learners):
the AR term (y_{t-1}, y_{t-2}), u_t, u_{t-1}, and the 2K spectral features (phi_k * u)_t and
((-1)^s phi_k * u)_t of a filter bank (lag 0 included):

* hankel_ctx    Hankel filters of length L' = sqrt(T): a learner whose context is L'
* tensor        tensorized filters of length T built from Hankel factors of length ~ sqrt(T)
                (`spectralds.filters` variant "tensor", phi_i^(L1) (x) phi_j^(L2))
* hankel_full   Hankel filters of length T (full context, for reference)

The comparator is the best FIXED predictor with FULL context in hindsight: least squares on the
hankel_full features over the whole stream (the features contain the true LDS's predictor up to the
spectral approximation error). Asymmetric regret(T) = learner's cumulative loss - the comparator's.
The slope of log regret vs log T is fitted by least squares over the T grid (mean over seeds).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from _bench_common import emit, save_figure
from scipy.fft import irfft, next_fast_len, rfft

from spectralds.filters import spectral_filters

LEARNERS = ("hankel_ctx", "tensor", "hankel_full")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--log2-T", type=int, nargs="+", default=list(range(9, 17)), help="horizons T = 2^n")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--num-filters", type=int, default=16, help="K per bank (2K spectral features)")
    p.add_argument("--state-dim", type=int, default=8)
    p.add_argument("--delta", type=float, default=1e-4, help="largest eigenvalue of A is 1 - delta")
    p.add_argument("--obs-noise", type=float, default=0.1)
    p.add_argument("--proc-noise", type=float, default=0.01)
    p.add_argument("--step", choices=["norm", "diag"], default="norm", help="OGD step sizes (online_loss)")
    p.add_argument("--no-ar", action="store_true",
                   help="ablation: the learners get no y features (the comparator keeps them)")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.log2_T, args.seeds, args.num_filters = [6, 7], args.seeds[:1], 4
    return args


def make_stream(T: int, h: int, delta: float, obs: float, proc: float, seed: int, n: int):
    """x_t = A x_{t-1} + b u_t + w_t, y_t = c.x_t + d u_t + v_t (scalar u, y; w, v Gaussian noise);
    A = Q diag(lam) Q^T symmetric, lam ~ U[0, 1] with the largest set to 1 - delta (marginally stable,
    memory ~ 1/delta steps). The system depends on the seed only, the stream on (seed, n): every T of a
    seed sees the same system, so regret vs T is not confounded by a different system per T."""
    rng = np.random.default_rng([seed])
    lam = rng.uniform(0.0, 1.0, h)
    lam[np.argmax(lam)] = 1.0 - delta
    q, _ = np.linalg.qr(rng.standard_normal((h, h)))
    A = (q * lam) @ q.T
    b, c = rng.standard_normal(h) / math.sqrt(h), rng.standard_normal(h) / math.sqrt(h)
    d = rng.standard_normal()
    rng = np.random.default_rng([seed, n])
    u = rng.standard_normal(T)
    w, v = proc * rng.standard_normal((T, h)), obs * rng.standard_normal(T)
    x, y = np.zeros(h), np.empty(T)
    for t in range(T):
        x = A @ x + b * u[t] + w[t]
        y[t] = c @ x + d * u[t] + v[t]
    return u, y


def causal_conv(u: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """(T,) * (L, K) -> (T, K): sum_{s < L} filters[s] u_{t-s}, by FFT."""
    T, L = len(u), filters.shape[0]
    n = next_fast_len(T + L - 1, real=True)
    return irfft(rfft(u, n)[:, None] * rfft(filters, n, axis=0), n, axis=0)[:T]


def features(u: np.ndarray, y: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """(T, 4 + 2K): y_{t-1}, y_{t-2}, u_t, u_{t-1}, then the "+" and "-" spectral features."""
    T = len(u)
    lag = lambda a, k: np.concatenate([np.zeros(k), a[: T - k]])  # noqa: E731
    alt = (-1.0) ** np.arange(filters.shape[0])
    spectral = np.concatenate([causal_conv(u, filters), causal_conv(u, filters * alt[:, None])], axis=1)
    return np.column_stack([lag(y, 1), lag(y, 2), u, lag(u, 1), spectral])


def online_loss(f: np.ndarray, y: np.ndarray, step: str = "norm") -> np.ndarray:
    """Per-step losses of online gradient descent: predict W f_t, pay (y_t - W f_t)^2, then step
    W -= eta_t g_t with g_t the loss gradient and eta_t = 1 / sqrt(sum_{s<=t} |g_s|^2) ("norm":
    AdaGrad-norm, one step size) or per coordinate 1 / sqrt(sum_{s<=t} g_s^2) ("diag": diagonal AdaGrad)."""
    w, losses = np.zeros(f.shape[1]), np.empty(len(y))
    acc = np.full(f.shape[1] if step == "diag" else 1, 1e-12)
    for t in range(len(y)):
        err = f[t] @ w - y[t]
        losses[t] = err * err
        g = 2.0 * err * f[t]
        acc += g * g if step == "diag" else g @ g
        w -= g / np.sqrt(acc)
    return losses


def hindsight_loss(f: np.ndarray, y: np.ndarray) -> float:
    """Cumulative loss of the best fixed linear predictor on these features, fitted on the whole stream."""
    w, *_ = np.linalg.lstsq(f, y, rcond=None)
    return float(np.sum((f @ w - y) ** 2))


def bank(kind: str, T: int, K: int) -> np.ndarray:
    if kind == "hankel_ctx":
        L = max(K, math.isqrt(T - 1) + 1)
        return spectral_filters(L, min(K, L), "hankel").numpy()
    return spectral_filters(T, K, "tensor" if kind == "tensor" else "hankel").numpy()


def run(args: argparse.Namespace) -> dict:
    rows = []
    for n in args.log2_T:
        T = 2**n
        for seed in args.seeds:
            u, y = make_stream(T, args.state_dim, args.delta, args.obs_noise, args.proc_noise, seed, n)
            f_full = features(u, y, bank("hankel_full", T, args.num_filters))
            comparator = hindsight_loss(f_full, y)
            row = {"T": T, "seed": seed, "L_ctx": max(args.num_filters, math.isqrt(T - 1) + 1),
                   "comparator": comparator, "noise_floor": T * args.obs_noise**2}
            for kind in LEARNERS:
                start = time.perf_counter()
                f = f_full if kind == "hankel_full" else features(u, y, bank(kind, T, args.num_filters))
                f = f[:, 2:] if args.no_ar else f  # columns 0, 1: y_{t-1}, y_{t-2}
                losses = online_loss(f, y, args.step)
                row[kind] = float(losses.sum())
                row[kind + "_regret"] = float(losses.sum()) - comparator
                row[kind + "_own_hindsight"] = hindsight_loss(f, y)
                row[kind + "_s"] = time.perf_counter() - start
            rows.append(row)
            print(f"T={T} seed={seed}: " + ", ".join(f"{k} {row[k + '_regret']:.2f}" for k in LEARNERS),
                  flush=True)
    return {"rows": rows, "args": vars(args), "slopes": slopes(rows)}


def mean_by_T(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    Ts = sorted({r["T"] for r in rows})
    return np.array(Ts), np.array([np.mean([r[key] for r in rows if r["T"] == T]) for T in Ts])


def slopes(rows: list[dict]) -> dict:
    """Least-squares slope of log(mean regret) vs log T (None if any mean regret is <= 0)."""
    out = {}
    for kind in LEARNERS:
        Ts, reg = mean_by_T(rows, kind + "_regret")
        ok = (reg > 0).all() and len(Ts) > 1
        out[kind] = float(np.polyfit(np.log(Ts), np.log(reg), 1)[0]) if ok else None
    return out


def table(result: dict) -> str:
    rows = result["rows"]
    lines = ["| T | L' | comparator loss | " + " | ".join(f"{k} regret" for k in LEARNERS)
             + " | regret/T (hankel_ctx) |", "|---" * (4 + len(LEARNERS)) + "|"]
    Ts, comp = mean_by_T(rows, "comparator")
    regs = {k: mean_by_T(rows, k + "_regret")[1] for k in LEARNERS}
    for i, T in enumerate(Ts):
        ctx = next(r["L_ctx"] for r in rows if r["T"] == T)
        lines.append(f"| {T} | {ctx} | {comp[i]:.1f} | " + " | ".join(f"{regs[k][i]:.2f}" for k in LEARNERS)
                     + f" | {regs['hankel_ctx'][i] / T:.2e} |")
    fits = ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} n/a" for k, v in result["slopes"].items())
    return "\n".join(lines) + f"\n\nfitted slope of log regret vs log T: {fits}"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for kind in LEARNERS:
        Ts, reg = mean_by_T(result["rows"], kind + "_regret")
        s = result["slopes"][kind]
        ax.plot(Ts, np.abs(reg), marker="o", label=f"{kind} (slope {s:.2f})" if s is not None else kind)
    Ts = np.array(sorted({r["T"] for r in result["rows"]}))
    ax.plot(Ts, Ts**0.5 * 2, "k:", lw=0.8, label="~ sqrt(T)")
    ax.plot(Ts, Ts * 0.01, "k--", lw=0.8, label="~ T")
    ax.set(xscale="log", yscale="log", xlabel="T (stream length)", ylabel="asymmetric regret (mean of seeds)",
           title="Online spectral filtering, context L' = sqrt(T)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    emit(result, table(result), args.json, args.plot, plot)


if __name__ == "__main__":
    main()
