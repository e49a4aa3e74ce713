"""`spectralds eval`: lm-evaluation-harness tasks on one or more checkpoints, side by side."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

from spectralds.cli_signature import library_defaults
from spectralds.errors import UserError
from spectralds.evaluation.outputs import check_eval_outputs, eval_inputs
from spectralds.evaluation.run import check_limit, evaluate_models
from spectralds.layers import DECODE_METHODS

EVAL_DEFAULTS = library_defaults(evaluate_models)


def _fewshot(text: str) -> int | dict[str, int]:
    """ "0" -> 0; "0,mmlu=5" -> {"*": 0, "mmlu": 5}."""
    counts: dict[str, int] = {}
    for item in text.split(","):
        task, _, count = item.rpartition("=")
        if not count.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected N or TASK=N, got {item!r}")
        counts[task.strip() or "*"] = int(count)
    return counts["*"] if list(counts) == ["*"] else counts


FewShot = Annotated[int | dict[str, int] | None, _fewshot]  # parsed from text by _fewshot


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


def _rank_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def evaluate(
    *,
    ckpt: Sequence[str],
    label: Sequence[str] | None = None,
    tasks: str,
    num_fewshot: FewShot = EVAL_DEFAULTS["num_fewshot"],
    batch_size: int = EVAL_DEFAULTS["batch_size"],
    include_path: str | None = EVAL_DEFAULTS["include_path"],
    limit: float | None = EVAL_DEFAULTS["limit"],
    tokenizer: str | None = EVAL_DEFAULTS["tokenizer"],
    decode: Literal[DECODE_METHODS] = EVAL_DEFAULTS["decode"],
    shared_context: int = EVAL_DEFAULTS["shared_context"],
    device: str | None = EVAL_DEFAULTS["device"],
    offline: bool = False,
    output: str | None = None,
    log_dir: str | None = None,
    verbosity: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "ERROR",
) -> None:
    """Evaluate checkpoints on lm-eval tasks: one row per checkpoint, then their difference.

    Under `torchrun --nproc-per-node N -m spectralds eval ...` the documents are split across the N
    processes (one GPU each, or CPU with gloo) and rank 0 prints and writes the results.

    Args:
        ckpt: a checkpoint (repeat: one row each)
        label: row label per --ckpt (None: file name)
        tasks: comma-separated lm-eval task or group names
        num_fewshot: N for every task, or per task: 0,mmlu=5 (None: each task's own setting)
        batch_size: requests per forward pass
        include_path: a folder of extra task YAMLs
        limit: documents per task (< 1: a fraction)
        tokenizer: tokenizer (None: the one each model trained with)
        decode: STU decoding
        shared_context: score requests sharing a context of at least N tokens (a question's choices)
            from one run of it; 0: a full forward per request
        device: None: cuda when available, else cpu (under torchrun: cuda:LOCAL_RANK)
        offline: never download (sets HF_HUB_OFFLINE)
        output: results JSON; its markdown table goes beside it with suffix .md (results.json: results.md),
            replacing only a report spectralds eval wrote
        log_dir: also log the metrics to TensorBoard here
        verbosity: lm-eval's log level (ERROR: its per-task notices would bury the table)
    """
    limit = check_limit(limit)
    labels = _labels(list(ckpt), None if label is None else list(label))
    # before the evaluation, not after it: no output may be an input, nor a user's unrelated file
    check_eval_outputs(output, log_dir, labels, eval_inputs(list(ckpt), tokenizer, include_path))
    from contextlib import nullcontext

    from spectralds.evaluation import format_table, log_tensorboard
    from spectralds.evaluation import offline as offline_hub
    from spectralds.evaluation.quiet import quiet_lm_eval
    from spectralds.evaluation.table import write_results

    with offline_hub() if offline else nullcontext(), quiet_lm_eval(verbosity):
        results = evaluate_models(
            dict(zip(labels, ckpt, strict=True)), tasks.split(","), include_path=include_path,
            num_fewshot=num_fewshot, batch_size=batch_size, limit=limit, tokenizer=tokenizer,
            device=device, decode=decode, shared_context=shared_context,
        )
    if not _rank_zero():  # data-parallel (torchrun): every rank has the results, rank 0 reports them
        return
    print(format_table(results))
    if log_dir is not None:
        log_tensorboard(results, log_dir)
    if output is not None:  # last: results.json exists only for an evaluation that completed
        write_results(results, output)
