"""Length generalization on the synthetic LDS task (issue 12; arXiv 2411.01035): train short, test long.

    python tools/length_generalization.py                          # defaults: ~7 min, 1 thread, busy CPU
    python tools/length_generalization.py --json lg.json --plot lg.png
    python tools/length_generalization.py --train-len 256 --eval-mults 1 4 16 --steps 300 --seeds 0 1 2

Every model is trained on sequences of --train-len steps from a marginally stable random LDS and then
scored, per position, on validation sequences of train-len x each --eval-mult. Settings come from the
configs/lengthgen.yaml (+ configs/lengthgen/*.yaml), instantiated through the same LightningCLI as
`spectralds fit --config ...`; this tool only overrides lengths, steps and seeds (see `cli_overrides`).
All models are built for the longest evaluation length (model seq_len), so only what they learned from
short sequences decides how they fare beyond it:

* stu         STU, Hankel filters of the full evaluation length (training reaches only their first taps)
* stu_tensor  STU, tensorized filters phi_i^(L1) (x) phi_j^(L2) of the full evaluation length
* stu_short   STU, Hankel filters of length train-len, zero beyond: a context of train-len steps, exactly
              what training saw (a reference: it cannot use the older inputs)
* attn        full causal softmax attention with RoPE
* lds         a diagonal LDS trained directly (A, B, C learnable)

Models are causal, so the error at positions < L is the same whichever longer length is evaluated; the
tool still runs every length separately and reports the largest difference ("causality gap").
The target has no observation noise, so the best achievable MSE is 0; the zero predictor's MSE (the
mean squared output) gives the scale, and "MSE/zero" is the error relative to it. The "context-T oracle"
row is the target system itself with its impulse response cut to train-len lags: the best a predictor
that ignores older inputs can do, so beating it beyond train-len is what length generalization means.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import yaml
from _bench_common import format_table, machine_info

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
BASE = CONFIGS / "lengthgen.yaml"  # the task and the STU; a variant file overrides the model only
# name -> (variant file in configs/lengthgen/, or None for the base alone; description)
MODELS = {
    "stu": (None, "STU, Hankel filters of the eval length"),
    "stu_tensor": ("stu_tensor.yaml", "STU, tensor filters of the eval length"),
    "stu_short": (None, "STU, Hankel filters of the train length, zero beyond"),
    "attn": ("attn.yaml", "full causal attention, RoPE"),
    "lds": ("lds.yaml", "diagonal LDS trained directly"),
}


def config_args(name: str) -> list[str]:
    """The --config arguments of one model: the base, then its variant."""
    variant = MODELS[name][0]
    extra = [] if variant is None else ["--config", str(CONFIGS / "lengthgen" / variant)]
    return ["--config", str(BASE), *extra]


ORACLE = "context-T oracle"
EVAL_BATCH = 4  # validation sequences per forward pass (full attention at 16x is O(L^2) memory)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-len", type=int, default=128, help="training sequence length T")
    p.add_argument("--eval-mults", type=int, nargs="+", default=[1, 4, 16], help="eval lengths / T")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per seed and model")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--batch-size", type=int, default=None, help="default: the configs' value")
    p.add_argument("--num-val", type=int, default=None, help="validation sequences (default: configs')")
    p.add_argument("--delta", type=float, default=None, help="target max|a| = 1 - delta (default: configs')")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1: robust on a busy CPU)")
    p.add_argument("--json", default=None, help="write every number (and per-position curves) here")
    p.add_argument("--plot", default=None, help="write a PNG of per-position MSE vs position here")
    p.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
    args = p.parse_args(argv)
    if args.quick:
        args.train_len, args.eval_mults, args.steps, args.seeds = 16, [1, 4], 4, args.seeds[:1]
        args.batch_size, args.num_val = 4, 4
    args.eval_mults = sorted(set(args.eval_mults))
    if args.train_len < 1 or args.steps < 1 or args.eval_mults[0] < 1:
        p.error("--train-len, --steps and --eval-mults must be positive")
    return args


def cli_overrides(args: argparse.Namespace, seed: int, root: str) -> list[str]:
    """What this tool changes in a lengthgen config: lengths, steps, seeds, and no logging/checkpoints."""
    max_len = args.train_len * args.eval_mults[-1]
    out = [
        f"--seed_everything={seed}",
        f"--trainer.max_steps={args.steps}",
        f"--trainer.default_root_dir={root}",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.limit_val_batches=0",  # this tool evaluates by itself, per position
        "--trainer.num_sanity_val_steps=0",
        f"--model.init_args.seq_len={max_len}",
        f"--data.init_args.seq_len={args.train_len}",
        f"--data.init_args.val_seq_len={max_len}",
        f"--data.init_args.seed={seed}",
    ]
    batch_size = args.batch_size or config_value("batch_size")
    # One epoch of fresh sequences: every optimizer step sees new data.
    out.append(f"--data.init_args.batch_size={batch_size}")
    out.append(f"--data.init_args.num_train={args.steps * batch_size}")
    if args.num_val is not None:
        out.append(f"--data.init_args.num_val={args.num_val}")
    if args.delta is not None:
        out.append(f"--data.init_args.delta={args.delta}")
    if args.quick:
        out.append("--model.init_args.num_filters=8")
    return out


def config_value(key: str):
    """A data setting of the task (the base config: variants never change the data)."""
    config = yaml.safe_load(BASE.read_text())
    return config["data"]["init_args"][key]


def build_run(name: str, args: argparse.Namespace, seed: int, root: str):
    """(model, datamodule, trainer) for one model and seed, as `spectralds fit --config` would build them."""
    from spectralds.cli_lightning import SpectraLDSCLI

    with warnings.catch_warnings():  # "args given while sys.argv is set too": intended here
        warnings.filterwarnings("ignore", message=".*args parameter is intended.*")
        cli = SpectraLDSCLI(
            args=[*config_args(name), *cli_overrides(args, seed, root)], run=False
        )
    if name == "stu_short":
        shorten_filters(cli.model, args.train_len)
    return cli.model, cli.datamodule, cli.trainer


def shorten_filters(model: torch.nn.Module, length: int) -> None:
    """Give every STU the Hankel filters of `length` taps, zero-padded: its context is `length` steps."""
    from spectralds.filters import spectral_filters
    from spectralds.layers.stu import STU

    layers = [m for m in model.modules() if isinstance(m, STU)]
    if not layers:
        raise ValueError("stu_short needs a model with STU layers")
    for layer in layers:
        if layer.num_filters > length:
            raise ValueError(f"stu_short needs num_filters ({layer.num_filters}) <= --train-len ({length})")
        short = torch.zeros_like(layer.phi)
        short[:length] = spectral_filters(length, layer.num_filters, layer.variant).to(short.dtype)
        layer.phi = short


@torch.no_grad()
def per_position_mse(model, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(T,) float64: MSE at each position over all sequences and output channels."""
    model.eval()
    total = torch.zeros(u.shape[1], dtype=torch.float64)
    for start in range(0, u.shape[0], EVAL_BATCH):
        err = model(u[start : start + EVAL_BATCH]) - y[start : start + EVAL_BATCH]
        total += err.double().pow(2).sum(dim=(0, 2))
    return total / (u.shape[0] * y.shape[2])


def context_oracle_mse(system, u: torch.Tensor, y: torch.Tensor, context: int) -> torch.Tensor:
    """(T,) per-position MSE of the target system itself with its impulse response cut to `context` lags.

    The best any predictor limited to that context can do here (the inputs are white, the outputs
    noiseless), and the bar that "length generalization" has to beat beyond the training length.
    """
    length = u.shape[1]
    kernel = torch.from_numpy(system.impulse_response(min(context, length)))  # (lags, d_out, d_in)
    n = 2 * length
    spectrum = torch.fft.rfft(kernel, n=n, dim=0)  # (F, d_out, d_in)
    inputs = torch.fft.rfft(u.double(), n=n, dim=1)  # (B, F, d_in)
    pred = torch.fft.irfft(torch.einsum("foi,bfi->bfo", spectrum, inputs), n=n, dim=1)[:, :length]
    return (pred - y.double()).pow(2).mean(dim=(0, 2))


def summarize(
    curve: torch.Tensor, zero: torch.Tensor, oracle: torch.Tensor, train_len: int
) -> dict[str, float | None]:
    """Mean MSE within the training length, beyond it, and overall; the overall MSE relative to the zero
    predictor's, and the MSE beyond the training length relative to the context-T oracle's there (< 1:
    the model uses inputs older than anything training showed it)."""
    beyond = curve[train_len:]
    return {
        "within": curve[:train_len].mean().item(),
        "beyond": beyond.mean().item() if beyond.numel() else None,
        "overall": curve.mean().item(),
        "relative": (curve.mean() / zero.mean()).item(),
        "vs_oracle": (beyond.mean() / oracle[train_len:].mean()).item() if beyond.numel() else None,
    }


def run_one(name: str, args: argparse.Namespace, seed: int) -> dict:
    """Train one model with one seed; per-position curves at every eval length and their summaries."""
    with tempfile.TemporaryDirectory() as root:  # Lightning writes the resolved config there
        model, data, trainer = build_run(name, args, seed, root)
        start = time.perf_counter()
        trainer.fit(model, data)
        seconds = time.perf_counter() - start
    u, y = data.val_dataset.tensors
    lengths = [args.train_len * m for m in args.eval_mults]
    curves = {n: per_position_mse(model, u[:, :n], y[:, :n]) for n in lengths}
    longest = curves[lengths[-1]]
    gap = max((c - longest[: len(c)]).abs().max().item() / longest.max().item() for c in curves.values())
    zero = y.double().pow(2).mean(dim=(0, 2))
    oracle = context_oracle_mse(data.system, u, y, args.train_len)
    return {
        "seed": seed,
        "train_seconds": seconds,
        "causality_gap": gap,
        "metrics": {n: summarize(c, zero[:n], oracle[:n], args.train_len) for n, c in curves.items()},
        "curve": longest.tolist(),
        "zero_curve": zero.tolist(),
        "oracle_curve": oracle.tolist(),
    }


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    if any(v is None for v in values):
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table_rows(results: dict[str, list[dict]], args: argparse.Namespace) -> list[dict]:
    """One row per (model, eval length), mean ± std over seeds; the zero predictor and oracle first."""
    rows = []
    any_runs = next(iter(results.values()))
    for length_mult in args.eval_mults:
        n = args.train_len * length_mult
        zero = [torch.tensor(r["zero_curve"][:n], dtype=torch.float64) for r in any_runs]
        oracle = [torch.tensor(r["oracle_curve"][:n], dtype=torch.float64) for r in any_runs]
        pairs = list(zip(zero, oracle, strict=True))
        rows.append(_row("zero predictor", n, [summarize(z, z, o, args.train_len) for z, o in pairs]))
        rows.append(_row(ORACLE, n, [summarize(o, z, o, args.train_len) for z, o in pairs]))
        for name, runs in results.items():
            rows.append(_row(name, n, [r["metrics"][n] for r in runs]))
    return rows


def _row(name: str, length: int, stats: list[dict]) -> dict:
    """Means and stds of each summary; "*_text" holds the printed cell (None prints "-")."""
    row = {"model": name, "eval_len": length}
    for key in ("within", "beyond", "overall", "relative", "vs_oracle"):
        mean, std = mean_std([s[key] for s in stats])
        row[key], row[key + "_std"] = mean, std
        fmt = "{:.2e} ± {:.1e}" if key in ("within", "beyond", "overall") else "{:.3f} ± {:.3f}"
        row[key + "_text"] = None if mean is None else fmt.format(mean, std)
    return row


def plot(path: str, results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    """Per-position MSE (mean over seeds) vs position, log-log, averaged in log-spaced bins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    length = args.train_len * args.eval_mults[-1]
    edges = sorted({int(round(x)) for x in torch.logspace(0, math.log10(length), 60).tolist()} | {0})
    edges = [e for e in edges if e < length] + [length]
    centers = [(lo + hi - 1) / 2 + 1 for lo, hi in zip(edges[:-1], edges[1:], strict=True)]

    def binned(curves: list[list[float]]) -> list[float]:
        mean = torch.tensor(curves, dtype=torch.float64).mean(0)
        return [mean[lo:hi].mean().item() for lo, hi in zip(edges[:-1], edges[1:], strict=True)]

    fig, ax = plt.subplots(figsize=(10, 4.5))
    any_runs = next(iter(results.values()))
    ax.plot(centers, binned([r["zero_curve"] for r in any_runs]), "k--", lw=1, label="zero predictor")
    oracle_label = f"{ORACLE}: the target's own kernel, lags < {args.train_len} only"
    ax.plot(centers, binned([r["oracle_curve"] for r in any_runs]), "k:", lw=1.5, label=oracle_label)
    for name, runs in results.items():
        ax.plot(centers, binned([r["curve"] for r in runs]), lw=1.5, label=f"{name}: {MODELS[name][1]}")
    ax.axvline(args.train_len, color="gray", lw=1)
    ax.text(
        args.train_len * 1.05, 0.97, "train length", transform=ax.get_xaxis_transform(), fontsize=8, va="top"
    )
    ax.set(xscale="log", yscale="log", xlabel="position t (1-based)", ylabel="MSE at position t")
    ax.set_title(
        f"trained at T={args.train_len} for {args.steps} steps; mean of {len(args.seeds)} seed(s)", fontsize=9
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}")


@contextlib.contextmanager
def quiet_lightning():
    """Keep Lightning's per-run banners, tips and warnings out of the report; restored on exit."""
    import spectralds.cli_lightning  # noqa: F401  (imports Lightning, which configures its loggers)

    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|LeafSpec).*")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info("cpu")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    longest = args.train_len * args.eval_mults[-1]
    results: dict[str, list[dict]] = {}
    with quiet_lightning():
        for name in args.models:
            results[name] = []
            for seed in args.seeds:
                run = run_one(name, args, seed)
                results[name].append(run)
                relative, vs_oracle = (run["metrics"][longest][k] for k in ("relative", "vs_oracle"))
                print(
                    f"{name:10s} seed {seed}: trained in {run['train_seconds']:.1f} s, "
                    f"at {longest}: MSE/zero {relative:.3f}, beyond/oracle {vs_oracle or float('nan'):.3f}",
                    flush=True,
                )
    rows = table_rows(results, args)
    columns = [
        ("model", "model", "s"),
        ("eval len", "eval_len", "d"),
        (f"MSE t<{args.train_len}", "within_text", "s"),
        (f"MSE t>={args.train_len}", "beyond_text", "s"),
        ("MSE all", "overall_text", "s"),
        ("MSE/zero all", "relative_text", "s"),
        (f"t>={args.train_len} vs oracle", "vs_oracle_text", "s"),
    ]
    print(f"\nper-position MSE, mean ± std over seeds {args.seeds} (threads={args.threads})")
    print(format_table(rows, columns))
    gap = max(r["causality_gap"] for runs in results.values() for r in runs)
    print(f"causality gap (largest relative change of a shared position across eval lengths): {gap:.1e}")
    payload = {
        "machine": info,
        "args": vars(args),
        "descriptions": {name: MODELS[name][1] for name in results},
        "table": [{k: v for k, v in r.items() if not k.endswith("_text")} for r in rows],
        "runs": results,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(payload))
        print(f"results written to {args.json}")
    if args.plot:
        plot(args.plot, results, args)
    return payload


if __name__ == "__main__":
    main()
