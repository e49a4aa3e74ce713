"""LAST vs uniform vs global H-infinity pruning of a distilled LDS model: validation loss per ratio.

    spectralds fit --config configs/quickstart.yaml   # writes runs/quickstart/version_N/checkpoints/lds.ckpt
    python tools/bench_prune.py --ckpt runs/quickstart/version_0/checkpoints/lds.ckpt \
        --json prune.json --plot prune.png

Each (method, ratio) prunes a fresh copy of the distilled model (one shot, no retraining) and evaluates it
on the same validation windows of the data the model trained on.
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

from spectralds.checkpoint import load_model, read_checkpoint  # noqa: E402
from spectralds.data import TextDataModule  # noqa: E402
from spectralds.distill.prune import METHODS, prune_lds_layers  # noqa: E402


@torch.inference_mode()
def val_loss(model, batches) -> float:
    total, count = 0.0, 0
    for x, y in batches:
        logits = model(x)
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    return total / count


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a distilled LDS LanguageModel checkpoint")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--val-batches", type=int, default=16)
    p.add_argument("--no-refit", action="store_true", help="keep C as fitted (no least-squares re-solve)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    checkpoint = read_checkpoint(a.ckpt)
    model = load_model(a.ckpt, checkpoint=checkpoint)
    data_args = checkpoint.get("datamodule_hyper_parameters", {})
    data = TextDataModule(**{k: v for k, v in data_args.items() if not k.startswith("_")})
    data.prepare_data()
    data.setup("validate")
    batches = [b for _, b in zip(range(a.val_batches), data.val_dataloader(), strict=False)]
    base = val_loss(model, batches)
    records = []
    for method in a.methods:
        for ratio in a.ratios:
            pruned = copy.deepcopy(model)
            reports = prune_lds_layers(pruned, ratio, method, refit=not a.no_refit) if ratio > 0 else []
            kept = sum(r.states_after for r in reports) if reports else None
            loss = val_loss(pruned, batches)
            records.append(
                {
                    "method": method,
                    "ratio": ratio,
                    "val_loss": loss,
                    "change_pct": 100 * (loss / base - 1),
                    "states_kept": kept,
                    "per_layer": str([r.states_after for r in reports]),
                }
            )
    machine = machine_info("cpu")
    print(machine)
    print(f"distilled model {a.ckpt}: val loss {base:.5f} on {a.val_batches} batches")
    columns = [
        ("method", "method", "s"),
        ("ratio", "ratio", ".2f"),
        ("val loss", "val_loss", ".5f"),
        ("change %", "change_pct", "+.3f"),
        ("states kept per layer", "per_layer", "s"),
    ]
    print(format_table(records, columns))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": machine, "base_val_loss": base, "records": records}, f, indent=2)
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for method in a.methods:
            rs = [r for r in records if r["method"] == method]
            ax.plot([r["ratio"] for r in rs], [r["val_loss"] for r in rs], "o-", label=method)
        ax.set_xlabel("fraction of LDS states pruned")
        ax.set_ylabel("validation loss")
        ax.set_title("one-shot state pruning of the distilled model")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
    return records


if __name__ == "__main__":
    main()
