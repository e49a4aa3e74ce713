"""`spectralds eval`: lm-evaluation-harness tasks on one or more checkpoints, side by side."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from spectralds.cli_errors import CommandParser
from spectralds.errors import UserError
from spectralds.io import check_output_path
from spectralds.layers import DECODE_METHODS


def _parser() -> CommandParser:
    p = CommandParser(
        "spectralds eval",
        "Evaluate checkpoints on lm-eval tasks: one row per checkpoint, then their difference.",
    )
    p.add_argument("--ckpt", action="append", required=True, help="a checkpoint (repeat: one row each)")
    p.add_argument("--label", action="append", default=None, help="row label per --ckpt (None: file name)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task or group names")
    p.add_argument("--num-fewshot", type=_fewshot, default=None,
                   help="N for every task, or per task: 0,mmlu=5 (None: each task's own setting)")
    p.add_argument("--batch-size", type=int, default=8, help="requests per forward pass")
    p.add_argument("--include-path", default=None, help="a folder of extra task YAMLs")
    p.add_argument("--limit", type=float, default=None, help="documents per task (< 1: a fraction)")
    p.add_argument("--tokenizer", default=None, help="tokenizer (None: the one each model trained with)")
    p.add_argument("--decode", choices=DECODE_METHODS, default=DECODE_METHODS[0], help="STU decoding")
    p.add_argument("--device", default=None, help="None: cuda when available, else cpu")
    p.add_argument("--offline", action="store_true", help="never download (sets HF_HUB_OFFLINE)")
    p.add_argument("--output", default=None, help="results JSON; report.md is written beside it")
    p.add_argument("--log-dir", default=None, help="also log the metrics to TensorBoard here")
    p.add_argument("--verbosity", default="ERROR", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="lm-eval's log level (default ERROR: its per-task notices would bury the table)")
    return p


def _fewshot(text: str) -> int | dict[str, int]:
    """ "0" -> 0; "0,mmlu=5" -> {"*": 0, "mmlu": 5}."""
    counts: dict[str, int] = {}
    for item in text.split(","):
        task, _, count = item.rpartition("=")
        if not count.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected N or TASK=N, got {item!r}")
        counts[task.strip() or "*"] = int(count)
    return counts["*"] if list(counts) == ["*"] else counts


def _labels(ckpts: list[str], given: list[str] | None) -> list[str]:
    if given is not None:
        if len(given) != len(ckpts):
            raise UserError(f"{len(given)} --label for {len(ckpts)} --ckpt; give one per checkpoint or none")
        labels = given
    else:  # file names, with their folder when two share one (runs/a/last.ckpt, runs/b/last.ckpt)
        labels = [Path(c).name for c in ckpts]
        if len(set(labels)) < len(labels):
            labels = [str(Path(*Path(c).parts[-2:])) for c in ckpts]
    if len(set(labels)) < len(labels):
        raise UserError(f"two checkpoints have the same label ({', '.join(labels)}); pass --label")
    return labels


def eval_main(argv: list[str]) -> None:
    a = _parser().parse_args(argv)
    if a.output is not None:
        check_output_path(a.output, make_parents=True)  # before the evaluation, not after it
    if a.limit is not None and a.limit >= 1:
        a.limit = int(a.limit)
    from contextlib import nullcontext

    from spectralds.evaluation import evaluate_models, format_table, log_tensorboard, offline
    from spectralds.evaluation.table import write_results

    logging.getLogger("lm_eval").setLevel(a.verbosity)
    labels = _labels(a.ckpt, a.label)
    with offline() if a.offline else nullcontext():
        results = evaluate_models(
            dict(zip(labels, a.ckpt, strict=True)), a.tasks.split(","), include_path=a.include_path,
            num_fewshot=a.num_fewshot, batch_size=a.batch_size, limit=a.limit, tokenizer=a.tokenizer,
            device=a.device, decode=a.decode,
        )
    print(format_table(results))
    if a.output is not None:
        write_results(results, a.output)
    if a.log_dir is not None:
        log_tensorboard(results, a.log_dir)
