"""Evaluate several models on the same lm-eval tasks: `evaluate_models` (what `spectralds eval` runs).

lm-eval loads the tasks, builds few-shot contexts, computes and aggregates the metrics; this module
picks the tasks, turns lm-eval's failures that are the user's into one-line errors, and keeps only
the rows of the tasks asked for (a group such as mmlu keeps its aggregate, not its 57 subtasks).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from spectralds.errors import MissingFileError, UserError, check_float, check_int, first_line
from spectralds.evaluation import data_parallel
from spectralds.evaluation.task_checks import build_problem, check_task, leaf_tasks, yaml_syntax_problem

if TYPE_CHECKING:  # only a type here: importing spectralds.evaluation need not load Lightning
    from lightning import LightningModule

OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


@contextmanager
def offline() -> Iterator[None]:
    """No downloads from the Hugging Face hub inside the block: the environment variables (for child
    processes) and the flags that datasets and huggingface_hub already read at import, all restored
    after it, so an evaluation inside a training run leaves the rest of the process as it was."""
    import datasets.config
    import huggingface_hub.constants

    flags = [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
             (huggingface_hub.constants, "HF_HUB_OFFLINE")]
    saved_env = {name: os.environ.get(name) for name in OFFLINE_VARIABLES}
    saved_flags = [getattr(module, name) for module, name in flags]
    os.environ.update(dict.fromkeys(OFFLINE_VARIABLES, "1"))
    for module, name in flags:
        setattr(module, name, True)
    try:
        yield
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for (module, name), value in zip(flags, saved_flags, strict=True):
            setattr(module, name, value)


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
        broken = yaml_syntax_problem(include_path, [t for t in tasks if t not in local.all_tasks])
        if broken:  # a YAML naming the missing task does not parse: say so now, not after 13 s of indexing
            raise UserError(f"task YAML {broken}")
    manager = _indexed(str(Path(include_path).resolve()) if include_path else None, True)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = " or in " + str(include_path) if include_path else ""
        broken = yaml_syntax_problem(include_path, unknown, any_task=True) if include_path else None
        if broken:  # lm-eval skips a YAML it cannot parse: that is why the task is unknown
            where += f" (a task YAML there does not parse: {broken})"
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

    built: dict[str, Any] = {}
    for task in tasks:  # one at a time, so that an error names its task
        try:
            with _quiet_metric_search(), _no_dataset_bars():
                built.update(get_task_dict([task], manager))
        except (ConnectionError, OSError, FileNotFoundError) as e:
            hint = (
                " (offline: HF_DATASETS_OFFLINE/HF_HUB_OFFLINE are set; hub tasks need a machine with the "
                "Hugging Face hub, or their data already in the datasets cache)"
                if is_offline()
                else ""
            )
            raise UserError(f"the data of task {task} could not be loaded: {first_line(e)}{hint}") from e
        except UserError:
            raise
        except Exception as e:  # the task's YAML, its !function code or its data: the user's files
            source = getattr(manager.task_index.get(task), "yaml_path", None)
            where = f" (from {source})" if source else ""
            raise UserError(f"task {task} could not be built{where}: {build_problem(e)}") from e
    return built


class _DropLines(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextmanager
def _quiet_metric_search() -> Iterator[None]:
    """lm-eval logs an error for a metric it cannot find, then drops the metric; check_task turns that
    into a one-line UserError, so the log line would only say it twice."""
    logger, line = logging.getLogger("lm_eval.api.registry"), _DropLines("not found in the evaluate library")
    logger.addFilter(line)
    try:
        yield
    finally:
        logger.removeFilter(line)


@contextmanager
def _no_dataset_bars() -> Iterator[None]:
    """datasets draws a progress bar for every local JSON file it prepares: noise around the table and
    between an error and the prompt."""
    from datasets.utils import logging as datasets_logging

    enabled = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            datasets_logging.enable_progress_bar()


def _backend(model: LightningModule | torch.nn.Module | str | Path, **kwargs: Any) -> Any:
    from spectralds.evaluation.lm_eval_backend import SpectraLDSLM

    if isinstance(model, (str, Path)):
        return SpectraLDSLM(ckpt=str(model), **kwargs)
    return SpectraLDSLM(model=model, **kwargs)


def evaluate_models(
    models: Mapping[str, LightningModule | torch.nn.Module | str | Path],
    tasks: Sequence[str],
    include_path: str | Path | None = None,
    num_fewshot: int | Mapping[str, int] | None = None,
    batch_size: int = 8,
    limit: int | float | None = None,
    tokenizer: str | None = None,
    device: str | None = None,
    decode: str = "futurefill",
    bootstrap_iters: int = 0,
    log_samples: bool = False,
    shared_context: int = 1,
) -> dict[str, Any]:
    """Run lm-eval's `simple_evaluate` on every model (label -> module or checkpoint path).

    num_fewshot: one count for every task, or {task: count} with "*" for the others (the paper's
    table: {"mmlu": 5, "*": 0}); None or a missing task = the task's own default. A module given in
    `models` is left in the train/eval mode it came in.

    Returns {"tasks": [...], "num_fewshot": {task: count}, "limit": ..., "models": {label: {"results":
    {task: {metric: value}}, "higher_is_better": {task: {metric: bool}}, "n-shot": {task: count},
    "samples": lm-eval's per-document records (only with log_samples)}}}.
    bootstrap_iters=0 skips lm-eval's bootstrap standard errors (minutes for perplexity metrics).
    shared_context: the backend's (`SpectraLDSLM`): requests sharing a context of at least this many
    tokens (a question's choices) are scored from one run of it; 0: a full forward per request.

    Data-parallel under `torchrun --nproc-per-node N` or inside a DDP run: every rank calls this with the
    same arguments, lm-eval splits the documents across the ranks, and every rank returns the same
    results (gathered on rank 0, then broadcast); writing them is the caller's business, on rank 0.
    """

    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise UserError("no task given")
    if not models:
        raise UserError("no model given")
    shots = fewshot_groups(tasks, num_fewshot)
    limit = check_limit(limit)
    check_int("shared_context", shared_context, minimum=0)
    modes = {m: m.training for m in models.values() if isinstance(m, torch.nn.Module)}
    try:
        return _evaluate(models, tasks, include_path, shots, limit, bootstrap_iters, log_samples,
                         tokenizer=tokenizer, batch_size=batch_size, device=device, decode=decode,
                         shared_context=shared_context)
    finally:  # the backend puts a module in eval mode; a caller's training module goes back as it was
        for module, training in modes.items():
            module.train(training)


def _evaluate(
    models: Mapping[str, Any], tasks: list[str], include_path: str | Path | None,
    shots: dict[Any, list[str]], limit: int | float | None, bootstrap_iters: int, log_samples: bool,
    **backend_args: Any,
) -> dict[str, Any]:
    from lm_eval import simple_evaluate

    # Checkpoints first (fast), then the tasks (seconds), then the evaluation: bad input fails early.
    backends = {label: _backend(m, **backend_args) for label, m in models.items()}
    manager = task_manager(tasks, include_path)
    counts = {t: n for n, ts in shots.items() for t in ts}
    for requested in tasks:  # a group's subtasks get the group's few-shot count
        for name, task in leaf_tasks(load_tasks([requested], manager)):
            check_task(name, task, limit, counts.get(requested))
    out: dict[str, Any] = {"tasks": tasks, "num_fewshot": {t: n for n, ts in shots.items() for t in ts},
                           "limit": limit, "models": {}}
    for label, backend in backends.items():
        entry: dict[str, Any] = {"results": {}, "higher_is_better": {}, "n-shot": {}}
        if log_samples:
            entry["samples"] = {}
        for count, group in shots.items():  # one lm-eval run per few-shot setting
            result = simple_evaluate(
                model=backend, tasks=group, num_fewshot=count, limit=limit, task_manager=manager,
                bootstrap_iters=bootstrap_iters, log_samples=log_samples, verbosity=None,
            )
            # Data-parallel: rank 0 gathered every rank's documents and alone has the results.
            result = data_parallel.broadcast_object(result, backend.ranks)
            for t in (t for t in result["results"] if t in group):
                entry["results"][t] = _numbers(result["results"][t])
                entry["higher_is_better"][t] = result.get("higher_is_better", {}).get(t, {})
                entry["n-shot"][t] = result.get("n-shot", {}).get(t)
            if log_samples:  # in document order (lm-eval concatenates the ranks' shares)
                entry["samples"].update({task: _in_document_order(records) for task, records in
                                         (result.get("samples") or {}).items()})
        out["models"][label] = entry
    return out


def check_limit(limit: Any) -> int | float | None:
    """None, a whole number of documents (>= 1), or a fraction in (0, 1): lm-eval's two meanings."""
    if limit is None:
        return None
    check_float("limit", limit, minimum=0, strict=True)
    if limit >= 1 and not float(limit).is_integer():
        raise UserError(f"limit must be a whole number of documents or a fraction below 1, got {limit!r}")
    return int(limit) if limit >= 1 else float(limit)


def _in_document_order(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-document records sorted by document, each filter's together as in one process."""
    filters = list(dict.fromkeys(r.get("filter") for r in records))
    return sorted(records, key=lambda r: (filters.index(r.get("filter")), r["doc_id"]))


def fewshot_groups(
    tasks: Sequence[str], num_fewshot: int | Mapping[str, int] | None
) -> dict[Any, list[str]]:
    """{few-shot count (None: the task's default): [tasks]} in task order."""
    if num_fewshot is None or isinstance(num_fewshot, int):
        if num_fewshot is not None:
            check_int("num_fewshot", num_fewshot, minimum=0)
        return {num_fewshot: list(tasks)}
    unknown = [t for t in num_fewshot if t != "*" and t not in tasks]
    if unknown:
        raise UserError(f"num_fewshot names task(s) not evaluated: {', '.join(unknown)}")
    groups: dict[Any, list[str]] = {}
    for task in tasks:
        count = num_fewshot.get(task, num_fewshot.get("*"))
        if count is not None:
            check_int(f"num_fewshot of {task}", count, minimum=0)
        groups.setdefault(count, []).append(task)
    return groups


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
