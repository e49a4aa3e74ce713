"""The SpectraLDS paper's Figure 1 on our synthetic task: val MSE vs training step for an STU, an LDS trained
directly, attention, and the STU distilled to an LDS; plus the bare STU layer and the STU with AR terms.

    python tools/synthetic_lds.py --plot tools/results/cpu/synthetic_lds.png --json runs/synthetic_lds.json
    python tools/synthetic_lds.py --quick        # a few steps, for smoke tests

Task and settings come from configs/synthetic.yaml and its variants in configs/synthetic/ (system,
lengths, widths, optimizer and learning rate of each model), resolved as `spectralds fit` resolves them;
the loop is a plain PyTorch loop (same model classes and data module as `spectralds fit`), so every model
sees the same batches. Models:

* stu        SequenceRegression with one STU block, as configs/synthetic.yaml
* stu_ar     the same with ar_order=--ar-order (the STU paper's autoregressive terms; configs/synthetic/
             stu_ar.yaml writes 2)
* stu_bare   the STU layer alone, d_in -> d_out (the reference the synthetic configs should match)
* lds        SequenceRegression with a diagonal LDS trained directly (+ configs/synthetic/lds.yaml)
* attn       SequenceRegression with one attention block (+ configs/synthetic/attn.yaml)
* stu_to_lds at every evaluation, a copy of the `stu` model distilled to an LDS (SpectraLDS), evaluated
             (the older spelling stu->lds is still accepted, quoted: unquoted, a shell reads `>lds` as a
             redirection and writes a file named lds)
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from _bench_common import emit, format_table, machine_info, save_figure

from spectralds.cli_config import resolved_config
from spectralds.data.synthetic import SyntheticLDSDataModule
from spectralds.distill import get_fit
from spectralds.distill.convert import convert_stu_layers
from spectralds.layers import build_layer
from spectralds.models.regression import SequenceRegression

REPO = Path(__file__).resolve().parents[1]
# model -> its variant of configs/synthetic.yaml (None: the base, the STU; stu_ar sets --ar-order itself)
CONFIG = {"stu": None, "stu_ar": None, "stu_bare": None, "lds": "lds.yaml", "attn": "attn.yaml"}
DISTILLED = "stu_to_lds"
OLD_DISTILLED = "stu->lds"  # accepted when quoted; a shell reads it unquoted as `stu-` > lds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--ar-order", type=int, default=2)
    p.add_argument("--state-dim", type=int, default=64, help="LDS states of the distilled STU (<= L/4)")
    p.add_argument("--models", nargs="+", default=[*CONFIG, DISTILLED], choices=[*CONFIG, DISTILLED],
                   type=lambda name: DISTILLED if name == OLD_DISTILLED else name)
    p.add_argument("--noise", type=float, default=None, help="observation noise (default: the configs')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every = 4, 2
    return args


def load_config(name: str) -> dict:
    """The config `spectralds fit` runs for this model: the base, then its variant."""
    base, variant = REPO / "configs" / "synthetic.yaml", CONFIG[name]
    return resolved_config([base, *([base.with_suffix("") / variant] if variant else [])])


def build(name: str, args: argparse.Namespace) -> tuple[torch.nn.Module, float, type]:
    """The model, its learning rate and optimizer class, from its config file."""
    config = load_config(name)
    cfg = config["model"]["init_args"]
    cfg.setdefault("seq_len", config["data"]["init_args"]["seq_len"])  # written once, in data
    opt = cfg.pop("optimizer")
    opt_cls = getattr(torch.optim, opt["class_path"].rsplit(".", 1)[1])
    lr = opt["init_args"]["lr"]
    if name == "stu_bare":
        layer = build_layer("stu", dim=cfg["d_in"], dim_out=cfg["d_out"], seq_len=cfg["seq_len"],
                            num_filters=cfg["num_filters"])
        return layer, lr, opt_cls
    if name == "stu_ar":
        cfg["layer_kwargs"] = {"stu": {"ar_order": args.ar_order}}
    return SequenceRegression(**cfg), lr, opt_cls


@torch.no_grad()
def val_mse(model: torch.nn.Module, val: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    errors = [(model(u) - y).pow(2).mean().item() for u, y in val]
    return sum(errors) / len(errors)


def distilled_mse(model: torch.nn.Module, val, state_dim: int) -> float:
    lds_model = copy.deepcopy(model)
    stu = lds_model.blocks[0].mixer
    fit = get_fit(stu.seq_len, stu.num_filters, state_dim, progress=False)
    convert_stu_layers(lds_model, lambda _: fit)
    return val_mse(lds_model, val)


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    data_cfg = load_config("stu")["data"]["init_args"]
    if args.noise is not None:
        data_cfg["noise"] = args.noise
    if args.quick:  # smoke tests: fewer sequences
        data_cfg.update(num_train=64, num_val=8)
    data = SyntheticLDSDataModule(**{**data_cfg, "seed": args.seed})
    data.setup()
    val = list(data.val_dataloader())
    loader, train = iter(data.train_dataloader()), []  # batches drawn once, shared by every model
    names = [n for n in args.models if n != DISTILLED]
    if DISTILLED in args.models and "stu" not in names:
        names.insert(0, "stu")
    results: dict = {"models": {}, "machine": machine_info("cpu"), "args": vars(args)}
    zero = sum(y.pow(2).mean().item() for _, y in val) / len(val)
    results["zero_mse"] = zero
    for name in names:
        torch.manual_seed(args.seed)
        model, lr, opt_cls = build(name, args)
        opt = opt_cls(model.parameters(), lr=lr)
        curve, dcurve, train_time, tokens = [], [], 0.0, 0
        for step in range(1, args.steps + 1):
            if len(train) < step:
                try:
                    train.append(next(loader))
                except StopIteration:  # one epoch done: the data module's batches again
                    loader = iter(data.train_dataloader())
                    train.append(next(loader))
            u, y = train[step - 1]
            start = time.perf_counter()
            loss = torch.nn.functional.mse_loss(model(u), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            train_time += time.perf_counter() - start
            tokens += u.shape[0] * u.shape[1]
            if step % args.eval_every == 0 or step == args.steps:
                curve.append((step, val_mse(model, val)))
                if name == "stu" and DISTILLED in args.models:
                    dcurve.append((step, distilled_mse(model, val, args.state_dim)))
        results["models"][name] = {"curve": curve, "tokens_per_s": tokens / train_time,
                                   "final": curve[-1][1]}
        print(f"{name}: val MSE {curve[-1][1]:.3e}, {tokens / train_time:.0f} tokens/s", flush=True)
        if dcurve:
            results["models"][DISTILLED] = {"curve": dcurve, "tokens_per_s": float("nan"),
                                            "final": dcurve[-1][1]}
    return results


def report(results: dict) -> str:
    rows = []
    for name, r in results["models"].items():
        tps = r["tokens_per_s"]
        rows.append({"model": name, "last": r["final"], "best": min(v for _, v in r["curve"]),
                     "rel": r["final"] / results["zero_mse"], "tps": None if tps != tps else tps})
    columns = [("model", "model", "s"), ("val MSE (last)", "last", ".3e"), ("best", "best", ".3e"),
               ("MSE/zero", "rel", ".2e"), ("train tokens/s", "tps", ".0f")]
    return format_table(rows, columns) + f"\nzero predictor MSE {results['zero_mse']:.3e}"


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, r in results["models"].items():
        steps, mse = zip(*r["curve"], strict=True)
        ax.plot(steps, mse, marker="o", ms=3, label=name, ls="--" if name == DISTILLED else "-")
    ax.axhline(results["zero_mse"], color="gray", lw=0.8, ls=":", label="zero predictor")
    ax.set(yscale="log", xlabel="training step", ylabel="val MSE",
           title="Learning a random symmetric LDS (SpectraLDS Fig. 1 setting)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = run(args)
    emit(results, report(results), args.json, args.plot, plot)


if __name__ == "__main__":
    main()
