"""LAST as its paper ran it: one-shot state pruning of a trained diagonal-SSM classifier on ListOps.

    spectralds fit --config configs/listops.yaml      # writes runs/listops/version_N/checkpoints/last.ckpt
    python tools/listops_prune.py --ckpt runs/listops/version_0/checkpoints/last.ckpt \
        --json tools/results/cpu/listops_prune.json --plot tools/results/cpu/listops_prune.png

Each (method, ratio) prunes a fresh copy of the trained model (no retraining: the learned A, B, C of the
kept states stay as trained; the tensors shrink) and scores it on the test split of the data module the
checkpoint was trained on (regenerated from its seed). Methods: LAST, uniform H-infinity, global
H-infinity and random (--seeds draws; mean, min and max); and an ablation, "last-L": LAST with each
state's gain taken over the data's longest sequence L instead of an infinite horizon. Then, at --at
(33%, the paper's headline ratio), one row per method: states kept, parameters, the measured forward
time per sequence (--timing-batch test sequences, the models timed in turns; random: its first draw)
of the model, of its LDS layers alone and of one recurrent step of them, test accuracy and its loss
against the unpruned model; and the verdict on the paper's two claims. See tools/listops_prune.md for
the task, the numbers LRA published and what this run found.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
from _bench_common import emit, format_table, machine_info, save_figure

from spectralds.checkpoint_io import load_model, read_checkpoint
from spectralds.data.listops import ListOpsDataModule, collate
from spectralds.distill.prune import find_lds_layers, prune_lds_layers, select_states, state_scores
from spectralds.models.classification import accuracy

METHODS = ("last", "uniform", "global", "random", "last-L")
BASELINES = ("uniform", "global", "random")  # what the paper's claim 2 compares LAST with
LABELS = {"last": "LAST", "uniform": "uniform H-inf", "global": "global H-inf", "random": "random",
          "last-L": "LAST, H-inf over L steps"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a SequenceClassifier checkpoint with LDS layers")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.33, 0.4, 0.5, 0.6, 0.7, 0.8])
    p.add_argument("--at", type=float, default=0.33, help="the ratio of the summary table")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, default=5, help="random draws of the 'random' method")
    p.add_argument("--batch-size", type=int, default=100, help="evaluation batch size")
    p.add_argument("--timing-batch", type=int, default=16, help="test sequences per timed forward")
    p.add_argument("--repeats", type=int, default=20, help="timed forwards (the median is reported)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    if any(not 0 <= r < 1 for r in [*args.ratios, args.at]) or args.seeds < 1:
        p.error("ratios must lie in [0, 1) and --seeds be at least 1")
    if args.at not in args.ratios:
        args.ratios = sorted([*args.ratios, args.at])
    return args


def test_batches(checkpoint: dict, batch_size: int) -> tuple[list, ListOpsDataModule]:
    hparams = {k: v for k, v in checkpoint.get("datamodule_hyper_parameters", {}).items() if k[0] != "_"}
    data = ListOpsDataModule(**{**hparams, "batch_size": batch_size})
    data.setup("test")
    return list(data.test_dataloader()), data


@torch.no_grad()  # not inference_mode: the LDS step caches its tables by tensor version
def ms_per_sequence(models: list[torch.nn.Module], batch: tuple, repeats: int) -> list[tuple[float, ...]]:
    """Per model, median times in milliseconds: the forward per sequence on one batch; its LDS layers
    alone on a random input of the batch's shape, per sequence; and one recurrent decoding step of its
    LDS layers per sequence (`step`, the constant-time inference a state count sets). The models take
    turns in every round, so a load that changes during the measurement (a shared machine) hits all."""
    ids, lengths, _ = batch
    runs = []
    for model in models:
        x = torch.randn(*ids.shape, model.hparams.dim)
        layers = [layer for _, layer in find_lds_layers(model)]
        states = [layer.init_state(ids.shape[0]) for layer in layers]
        x_t = x[:, 0]
        runs += [lambda m=model: m(ids, lengths), lambda ls=layers, x=x: [layer(x) for layer in ls],
                 lambda ls=layers, ss=states, x=x_t: [la.step(x, s) for la, s in zip(ls, ss, strict=True)]]
    times: list[list[float]] = [[] for _ in runs]
    for round_ in range(repeats + 1):
        for run, spent in zip(runs, times, strict=True):
            start = time.perf_counter()
            run()
            if round_:  # the first round warms up
                spent.append(time.perf_counter() - start)
    ms = [1e3 * statistics.median(t) / ids.shape[0] for t in times]
    return list(zip(ms[::3], ms[1::3], ms[2::3], strict=True))


def describe(model: torch.nn.Module) -> dict:
    layers = [layer for _, layer in find_lds_layers(model)]
    return {"states": sum(layer.state_dim for layer in layers), "per_layer": [m.state_dim for m in layers],
            "params": sum(p.numel() for p in model.parameters()),
            "lds_params": sum(p.numel() for m in layers for p in m.parameters(recurse=False)),
            "state_floats": sum(m.channels * m.state_dim for m in layers)}


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    checkpoint = read_checkpoint(args.ckpt)
    model = load_model(args.ckpt, checkpoint=checkpoint)
    if not find_lds_layers(model):
        raise SystemExit(f"error: {args.ckpt} has no LDS layer to prune")
    batches, data = test_batches(checkpoint, args.batch_size)
    test = data.splits["test"]
    timing = collate([test[i] for i in range(min(args.timing_batch, len(test)))])
    base = accuracy(model, batches)
    train_labels = data.splits["train"].labels
    majority = max(set(train_labels), key=train_labels.count)  # the best constant answer, from training
    majority_acc = sum(label == majority for label in test.labels) / len(test)
    records, timed = [], {}
    for method in args.methods:
        for seed in range(args.seeds if method == "random" else 1):
            for ratio in args.ratios:
                pruned = copy.deepcopy(model)
                if ratio > 0:
                    horizon = data.seq_len if method == "last-L" else None
                    prune_lds_layers(pruned, ratio, method.removesuffix("-L"), seed=seed, horizon=horizon)
                acc = accuracy(pruned, batches) if ratio > 0 else base  # ratio 0: the model itself
                record = {"method": method, "seed": seed, "ratio": ratio, "acc": acc}
                record.update(describe(pruned))
                if ratio == args.at and seed == 0:
                    timed[method] = pruned, record
                records.append(record)
                print(f"{method:<8} seed {seed} ratio {ratio:.2f}: test acc {record['acc']:.4f}", flush=True)
    times = ms_per_sequence([model, *(m for m, _ in timed.values())], timing, args.repeats)
    keys = ("ms_per_seq", "lds_ms_per_seq", "step_us")
    unpruned = {**describe(model), "acc": base, **dict(zip(keys, times[0], strict=True))}
    for (_, record), measured in zip(timed.values(), times[1:], strict=True):
        record.update(zip(keys, measured, strict=True))
    for record in [unpruned, *(r for _, r in timed.values())]:
        record["step_us"] *= 1e3
    return {"machine": machine_info("cpu"), "args": vars(args), "unpruned": unpruned, "records": records,
            "memory": memory(model, args.at, data.seq_len), "seq_len": data.seq_len,
            "test_size": sum(b[2].numel() for b in batches), "majority_acc": majority_acc,
            "train": {k: checkpoint.get(k) for k in ("global_step", "epoch")}}


def memory(model: torch.nn.Module, ratio: float, length: int) -> list[dict]:
    """Per LDS layer: median time constant 1 / (1 - |a|) (steps) of the states LAST keeps and prunes at
    `ratio`, and how many states are slower than the longest sequence with their share of the layer's
    H-infinity score (the paper's, infinite horizon)."""
    layers = [layer for _, layer in find_lds_layers(model)]
    rows = []
    for i, (layer, kept) in enumerate(zip(layers, select_states(layers, ratio, "last"), strict=True)):
        tau = 1 / (1 - layer.system()[0].detach().double().abs())
        scores, mask = state_scores(layer), torch.zeros(layer.state_dim, dtype=torch.bool)
        mask[kept] = True
        slow = tau > length
        rows.append({"layer": i, "tau_kept": float(tau[mask].median()),
                     "tau_pruned": float(tau[~mask].median()), "slow_states": int(slow.sum()),
                     "slow_share": float(scores[slow].sum() / scores.sum())})
    return rows


def curve(result: dict, method: str) -> list[tuple[float, float, float, float]]:
    """(ratio, mean, min, max) test accuracy per ratio (one seed except for "random")."""
    out = []
    for ratio in result["args"]["ratios"]:
        accs = [r["acc"] for r in result["records"] if r["method"] == method and r["ratio"] == ratio]
        if accs:
            out.append((ratio, statistics.mean(accs), min(accs), max(accs)))
    return out


def summary_rows(result: dict) -> list[dict]:
    at, base = result["args"]["at"], result["unpruned"]
    rows = [{"method": "unpruned", **base, "kept": "/".join(map(str, base["per_layer"])), "loss": 0.0}]
    for method in result["args"]["methods"]:
        rs = [r for r in result["records"] if r["method"] == method and r["ratio"] == at]
        acc = statistics.mean(r["acc"] for r in rs)
        name = LABELS[method] + (f" (mean of {len(rs)})" if len(rs) > 1 else "")
        rows.append({"method": name, "states": rs[0]["states"], "params": rs[0]["params"],
                     "lds_params": rs[0]["lds_params"], "state_floats": rs[0]["state_floats"],
                     "ms_per_seq": rs[0]["ms_per_seq"], "lds_ms_per_seq": rs[0]["lds_ms_per_seq"],
                     "step_us": rs[0]["step_us"], "acc": acc,
                     "loss": 100 * (base["acc"] - acc),
                     "kept": "/".join(map(str, rs[0]["per_layer"])) if len(rs) == 1 else "random"})
    return rows


def verdict(result: dict) -> list[str]:
    """The paper's two claims, judged on this run's numbers."""
    at, base = result["args"]["at"], result["unpruned"]["acc"]
    means = {m: {r: acc for r, acc, _, _ in curve(result, m)} for m in result["args"]["methods"]}
    lines = []
    if "last" in means:
        loss = 100 * (base - means["last"][at])
        lines.append(f"claim 1 (LAST loses < 1% accuracy at {at:.0%} pruned): {loss:+.2f} points -> "
                     + ("holds" if loss < 1 else "does not hold"))
        others = [m for m in BASELINES if m in means]
        pruned = [r for r in result["args"]["ratios"] if r > 0]
        beaten = {m: sum(means["last"][r] > means[m][r] for r in pruned) for m in others}
        ties = {m: sum(means["last"][r] == means[m][r] for r in pruned) for m in others}
        at_best = all(means["last"][at] > means[m][at] for m in others)
        lines.append(f"claim 2 (LAST above the others at {at:.0%}): "
                     + ("holds" if at_best else "does not hold")
                     + "; ratios > 0 where LAST is strictly above: "
                     + ", ".join(f"{LABELS[m]} {beaten[m]}/{len(pruned)} (ties {ties[m]})" for m in others))
    return lines


def report(result: dict) -> str:
    u, at = result["unpruned"], result["args"]["at"]
    head = (f"unpruned test accuracy {u['acc']:.4f} on {result['test_size']} test sequences "
            f"(trained {result['train']['global_step']} steps; the majority class scores "
            f"{result['majority_acc']:.4f}); {u['states']} LDS states")
    grid = []
    for method in result["args"]["methods"]:
        row = {"method": LABELS[method]}
        row.update({f"{r:.2f}": acc for r, acc, _, _ in curve(result, method)})
        grid.append(row)
    grid_cols = [("test acc / ratio", "method", "s")] + [(f"{r:.2f}", f"{r:.2f}", ".4f")
                                                         for r in result["args"]["ratios"]]
    cols = [("at " + f"{at:.0%}", "method", "s"), ("states", "states", "d"), ("per layer", "kept", "s"),
            ("params", "params", "d"), ("LDS params", "lds_params", "d"),
            ("state floats", "state_floats", "d"), ("ms/seq", "ms_per_seq", ".3f"),
            ("LDS ms/seq", "lds_ms_per_seq", ".3f"), ("LDS step us/seq", "step_us", ".2f"),
            ("test acc", "acc", ".4f"), ("loss (points)", "loss", "+.2f")]
    memory_cols = [(f"LAST at {at:.0%}: layer", "layer", "d"), ("median tau kept", "tau_kept", ".1f"),
                   ("median tau pruned", "tau_pruned", ".1f"),
                   (f"states tau > L={result['seq_len']}", "slow_states", "d"),
                   ("their score share", "slow_share", ".3f")]
    return "\n\n".join([head, format_table(grid, grid_cols), format_table(summary_rows(result), cols),
                        format_table(result["memory"], memory_cols), "\n".join(verdict(result))])


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.3))
    for i, method in enumerate(result["args"]["methods"]):
        pts = curve(result, method)
        ratios = [100 * r for r, *_ in pts]
        (line,) = ax.plot(ratios, [100 * m for _, m, _, _ in pts], "osD^v"[i % 5] + "-", ms=4,
                          label=LABELS[method] + (" (mean, min-max band)" if method == "random" else ""))
        if method == "random" and result["args"]["seeds"] > 1:
            ax.fill_between(ratios, [100 * lo for *_, lo, _ in pts], [100 * hi for *_, hi in pts],
                            color=line.get_color(), alpha=0.15)
    ax.axhline(100 * result["unpruned"]["acc"], color="gray", lw=0.8, ls=":", label="unpruned")
    ax.axvline(100 * result["args"]["at"], color="gray", lw=0.6, ls="--")
    ax.set(xlabel="pruning ratio (% of LDS states)", ylabel="test accuracy (%)",
           title="ListOps: one-shot state pruning of a trained LDS classifier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    emit(result, report(result), args.json, args.plot, plot)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
