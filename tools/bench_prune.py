"""State pruning of a distilled LDS model, every method side by side: validation loss per ratio.

    spectralds fit --config configs/quickstart.yaml   # writes runs/quickstart/version_N/checkpoints/lds.ckpt
    python tools/bench_prune.py --ckpt runs/quickstart/version_0/checkpoints/lds.ckpt \
        --ratios 0.25 0.5 0.625 0.75 0.875 --json prune.json --plot prune.png

Each (method, ratio) prunes a fresh copy of the distilled model (one shot, no retraining; C re-solved for
the kept states unless --no-refit) and evaluates it on the same validation windows of the data the model
trained on. Columns: the change in val loss against the unpruned model, the kernel error (the relative
error of each layer's effective kernel, its filters weighted by its M, averaged over the layers: what the
pruning changed, free of the evaluation's noise), and the states kept per layer with, in parentheses, how
many of them are negative poles (the "-" branch). With --calibrate N, "last-refit+cal" also runs: the
refit-aware method with per-layer weights measured on N training batches (each layer's output energy over
the energy of the residual stream it is added to).

After the table, each ratio names its winner. Differences below --tie (percentage points of val loss)
are reported as ties: at light pruning every method moves the loss by a few thousandths of a percent,
in either direction (the unpruned model's own float32 rounding moves it by 0.0003%).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _bench_common import format_table, machine_info  # noqa: E402

from spectralds.checkpoint_io import load_model, read_checkpoint  # noqa: E402
from spectralds.data import TextDataModule  # noqa: E402
from spectralds.distill.prune import PRUNE_METHODS, find_lds_layers, kernel_error, prune_lds_layers  # noqa: E402

CALIBRATED = "last-refit+cal"


@torch.inference_mode()
def val_loss(model, batches) -> float:
    total, count = 0.0, 0
    for x, y in batches:
        logits = model(x)
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    return total / count


@torch.inference_mode()
def layer_weights(model, batches) -> list[float]:
    """Per LDS layer: mean square of its output over that of its parent's input (the residual stream,
    for a pre-norm block x + mixer(norm(x)))."""
    modules = dict(model.named_modules())
    sums: dict[str, list[float]] = {}

    def add(path: str, slot: int, tensor: torch.Tensor) -> None:
        sums[path][slot] += tensor.double().square().mean().item()

    hooks = []
    for path, layer in find_lds_layers(model):
        sums[path] = [0.0, 0.0]
        parent = modules[path.rpartition(".")[0]]
        hooks.append(layer.register_forward_hook(lambda m, i, out, p=path: add(p, 0, out)))
        hooks.append(parent.register_forward_pre_hook(lambda m, i, p=path: add(p, 1, i[0])))
    try:
        for x, _ in batches:
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return [out / resid for out, resid in sums.values()]


def branch_counts(model) -> list[tuple[int, int]]:
    """(states, negative poles) kept in each LDS layer."""
    return [(layer.state_dim, int((layer.system()[0] < 0).sum())) for _, layer in find_lds_layers(model)]


def winners(records: list[dict], tie: float) -> list[str]:
    """One line per ratio: the method with the lowest val loss, ties within `tie` points, and the one
    with the smallest kernel error."""
    lines = []
    for ratio in sorted({r["ratio"] for r in records if r["ratio"] > 0}):
        rows = sorted((r for r in records if r["ratio"] == ratio), key=lambda r: r["val_loss"])
        best = rows[0]
        tied = [r["method"] for r in rows[1:] if r["change_pct"] - best["change_pct"] < tie]
        text = f"ratio {ratio:.3f}: best {best['method']} ({best['change_pct']:+.4f}%)"
        if len(rows) > 1:
            text += f", next {rows[1]['method']} ({rows[1]['change_pct']:+.4f}%)"
        text += f"; tied within {tie}%: {', '.join(tied)}" if tied else f"; no other within {tie}%"
        errors = [r for r in rows if r.get("kernel_error") is not None]
        if errors:
            low = min(errors, key=lambda r: r["kernel_error"])
            text += f"; smallest kernel error {low['method']} ({low['kernel_error']:.2e})"
        lines.append(text)
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a distilled LDS LanguageModel checkpoint")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.625, 0.75, 0.875])
    # "random" is opt-in: the recorded tables predate it
    p.add_argument("--methods", nargs="+", default=[m for m in PRUNE_METHODS if m != "random"],
                   choices=PRUNE_METHODS)
    p.add_argument("--val-batches", type=int, default=16)
    p.add_argument(
        "--calibrate",
        type=int,
        default=0,
        metavar="N",
        help=f"also run {CALIBRATED!r}, its layer weights measured on N training batches",
    )
    p.add_argument("--no-refit", action="store_true", help="keep C as fitted (no least-squares re-solve)")
    p.add_argument("--tie", type=float, default=0.01, help="val loss differences (points) reported as ties")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    a = p.parse_args(argv)
    if any(not 0 <= r < 1 for r in a.ratios):
        p.error(f"every ratio must be in [0, 1), got {a.ratios}")
    if a.threads:
        torch.set_num_threads(a.threads)
    checkpoint = read_checkpoint(a.ckpt)
    model = load_model(a.ckpt, checkpoint=checkpoint)
    if not find_lds_layers(model):
        p.error(f"{a.ckpt} has no LDS layer: give the distilled checkpoint (lds.ckpt)")
    data_args = checkpoint.get("datamodule_hyper_parameters", {})
    data = TextDataModule(**{k: v for k, v in data_args.items() if not k.startswith("_")})
    data.prepare_data()
    data.setup("fit")
    batches = [b for _, b in zip(range(a.val_batches), data.val_dataloader(), strict=False)]
    base = val_loss(model, batches)
    runs = [(m, None) for m in a.methods]
    if a.calibrate:
        train = [b for _, b in zip(range(a.calibrate), data.train_dataloader(), strict=False)]
        weights = layer_weights(model, train)
        print("calibrated layer weights: " + ", ".join(f"{w:.3g}" for w in weights))
        runs.append((CALIBRATED, weights))
    originals = [layer for _, layer in find_lds_layers(model)]
    records = []
    for name, weights in runs:
        for ratio in a.ratios:
            pruned = copy.deepcopy(model)
            if ratio > 0:
                method = "last-refit" if weights is not None else name
                prune_lds_layers(pruned, ratio, method, refit=not a.no_refit, layer_weights=weights)
            layers = [layer for _, layer in find_lds_layers(pruned)]
            errors = [kernel_error(o, q) for o, q in zip(originals, layers, strict=True)]
            counts = branch_counts(pruned)
            loss = val_loss(pruned, batches)
            records.append(
                {
                    "method": name,
                    "ratio": ratio,
                    "val_loss": loss,
                    "change_pct": 100 * (loss / base - 1),
                    "kernel_error": sum(errors) / len(errors),
                    "states_kept": sum(n for n, _ in counts),
                    "per_layer": [n for n, _ in counts],
                    "negative_poles": [neg for _, neg in counts],
                    "kept": " ".join(f"{n}({neg})" for n, neg in counts),
                }
            )
            print(f"{name:<15} {ratio:.3f}  {records[-1]['change_pct']:+.4f}%", flush=True)
    machine = machine_info("cpu")
    print(machine)
    print(f"distilled model {a.ckpt}: val loss {base:.5f} on {len(batches)} batches")
    columns = [
        ("method", "method", "s"),
        ("ratio", "ratio", ".3f"),
        ("val loss", "val_loss", ".5f"),
        ("change %", "change_pct", "+.4f"),
        ("kernel err", "kernel_error", ".2e"),
        ("kept per layer (negative poles)", "kept", "s"),
    ]
    print(format_table(records, columns))
    summary = winners(records, a.tie)
    print("\n".join(summary))
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        payload = {
            "machine": machine,
            "args": vars(a),
            "base_val_loss": base,
            "records": records,
            "winners": summary,
        }
        with open(a.json, "w") as f:
            json.dump(payload, f, indent=2)
    if a.plot:
        plot(a.plot, records, [name for name, _ in runs], refit=not a.no_refit)
    return records


def plot(path: str, records: list[dict], methods: list[str], refit: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = "osD^vP*X"
    for i, method in enumerate(methods):
        rs = [r for r in records if r["method"] == method and r["ratio"] > 0]
        ratios = [r["ratio"] for r in rs]
        # the ablation "uniform-refit" often lies on "last-refit": draw "last-refit" on top, dashed
        style = {"ls": "--", "lw": 2.2, "zorder": 5} if method == "last-refit" else {"lw": 1.4}
        style["marker"] = markers[i % len(markers)]
        ax_loss.plot(ratios, [r["change_pct"] for r in rs], label=method, **style)
        ax_err.plot(ratios, [max(r["kernel_error"], 1e-18) for r in rs], label=method, **style)
    ax_loss.set_yscale("symlog", linthresh=0.01)
    ax_loss.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax_loss.set_ylabel("change in validation loss (%), symlog")
    ax_err.set_yscale("log")
    ax_err.set_ylabel("relative effective-kernel error (mean over layers)")
    for ax in (ax_loss, ax_err):
        ax.set_xlabel("fraction of LDS states pruned")
        ax.grid(alpha=0.3)
    ax_loss.legend()
    fig.suptitle(
        f"one-shot state pruning of the distilled model ({'C re-solved' if refit else 'C as fitted'})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
