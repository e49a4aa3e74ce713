"""Evaluate several models on the same lm-eval tasks: `evaluate_models` (what `spectralds eval` runs).

lm-eval loads the tasks, builds few-shot contexts, computes and aggregates the metrics; this module
picks the tasks, turns lm-eval's failures that are the user's into one-line errors, and keeps only
the rows of the tasks asked for (a group such as mmlu keeps its aggregate, not its 57 subtasks).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule

from spectralds.errors import MissingFileError, UserError, check_int, first_line

OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def set_offline() -> None:
    """No downloads from the Hugging Face hub: the environment variables for child processes, and the
    flags that datasets and huggingface_hub already read at import."""
    import datasets.config
    import huggingface_hub.constants

    for name in OFFLINE_VARIABLES:
        os.environ[name] = "1"
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True


def is_offline() -> bool:
    import datasets.config

    return bool(datasets.config.HF_HUB_OFFLINE)


def task_manager(tasks: Sequence[str], include_path: str | Path | None = None) -> Any:
    """An lm-eval TaskManager that knows every task in `tasks`, or a UserError naming the unknown ones.

    Indexing lm-eval's thousands of built-in YAMLs takes seconds, so when every task is in
    include_path only that folder is indexed.
    """
    if include_path is not None and not Path(include_path).is_dir():
        raise MissingFileError(f"--include-path {include_path} is not a directory")
    if include_path is not None:
        local = _indexed(str(Path(include_path).resolve()), False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = _indexed(str(Path(include_path).resolve()) if include_path else None, True)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = " or in " + str(include_path) if include_path else ""
        raise UserError(f"unknown task(s) {', '.join(unknown)}: not among lm-eval's tasks{where}")
    return manager


@lru_cache(maxsize=4)
def _indexed(include_path: str | None, include_defaults: bool) -> Any:
    """TaskManagers are kept: the index of task YAMLs is the same on every call (tasks are built anew)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def load_tasks(tasks: Sequence[str], manager: Any) -> dict[str, Any]:
    """Build the tasks once (their datasets are loaded here) so that a task whose data cannot be had
    fails before any model is evaluated, with one line saying which."""
    from lm_eval.tasks import get_task_dict

    try:
        return get_task_dict(list(tasks), manager)
    except (ConnectionError, OSError, FileNotFoundError) as e:
        hint = (
            " (offline: HF_DATASETS_OFFLINE/HF_HUB_OFFLINE are set; hub tasks need a machine with the "
            "Hugging Face hub, or their data already in the datasets cache)"
            if is_offline()
            else ""
        )
        names = ", ".join(tasks)
        raise UserError(f"the data of task(s) {names} could not be loaded: {first_line(e)}{hint}") from e


def _backend(model: LightningModule | torch.nn.Module | str | Path, **kwargs: Any) -> Any:
    from spectralds.evaluation.lm_eval_backend import SpectraLDSLM

    if isinstance(model, (str, Path)):
        return SpectraLDSLM(ckpt=str(model), **kwargs)
    return SpectraLDSLM(model=model, **kwargs)


def evaluate_models(
    models: Mapping[str, LightningModule | torch.nn.Module | str | Path],
    tasks: Sequence[str],
    include_path: str | Path | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    limit: int | float | None = None,
    tokenizer: str | None = None,
    device: str | None = None,
    decode: str = "futurefill",
    bootstrap_iters: int = 0,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Run lm-eval's `simple_evaluate` on every model (label -> module or checkpoint path).

    Returns {"tasks": [...], "num_fewshot": ..., "models": {label: {"results": {task: {metric: value}},
    "higher_is_better": {task: {metric: bool}}, "n-shot": {...}, "samples": ... (log_samples)}}}.
    bootstrap_iters=0 skips lm-eval's bootstrap standard errors (minutes for perplexity metrics).
    """
    from lm_eval import simple_evaluate

    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise UserError("no task given")
    if not models:
        raise UserError("no model given")
    if num_fewshot is not None:
        check_int("num_fewshot", num_fewshot, minimum=0)
    if limit is not None and not (isinstance(limit, (int, float)) and limit > 0):
        raise UserError(f"limit must be > 0, got {limit!r}")
    # Checkpoints first (fast), then the tasks (seconds), then the evaluation: bad input fails early.
    backends = {label: _backend(m, tokenizer=tokenizer, batch_size=batch_size, device=device,
                                decode=decode) for label, m in models.items()}
    manager = task_manager(tasks, include_path)
    load_tasks(tasks, manager)
    out: dict[str, Any] = {"tasks": tasks, "num_fewshot": num_fewshot, "limit": limit, "models": {}}
    for label, backend in backends.items():
        result = simple_evaluate(
            model=backend, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
            bootstrap_iters=bootstrap_iters, log_samples=log_samples, verbosity=None,
        )
        kept = [t for t in result["results"] if t in tasks]
        out["models"][label] = {
            "results": {t: _numbers(result["results"][t]) for t in kept},
            "higher_is_better": {t: result.get("higher_is_better", {}).get(t, {}) for t in kept},
            "n-shot": {t: result.get("n-shot", {}).get(t) for t in kept},
            **({"samples": result.get("samples")} if log_samples else {}),
        }
    return out


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """lm-eval's "acc,none" metric keys as "acc" (filters other than "none" keep theirs), numbers only."""
    kept = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or "_stderr" in key:
            continue
        if key.startswith("sample_len"):  # a document count, not a metric
            continue
        name, _, filt = key.partition(",")
        kept[name if filt in ("", "none") else key] = float(value)
    return kept
