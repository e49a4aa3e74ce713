"""Checks of a task's YAML and documents before any model is evaluated, with lm-eval's own methods.

lm-eval builds a task from its YAML and data and tries its first document; the other documents are
first rendered during the evaluation, where a bad one is a traceback (an answer index out of range, an
empty choice), a division by zero in the aggregation (a text with no words) or a silently wrong score
(a negative answer index picks the last choice; an unknown metric is dropped with a warning). Here
each document that will be evaluated is rendered once, through the task's own doc_to_* methods, and
the first bad one is a UserError naming the task, the document and the problem.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from spectralds.errors import UserError, check_int, first_line
from spectralds.evaluation.backend_args import generation_settings


def build_problem(error: BaseException) -> str:
    """What went wrong building a task from its YAML and data, in words (lm-eval and datasets raise
    StopIteration for an empty file, KeyError for a missing split, a wrapper around a JSON error)."""
    if isinstance(error, StopIteration):
        return "its data has no documents (an empty data file?)"
    if isinstance(error, KeyError):
        return f"{error.args[0]!r} is not in its data (a split or a field the YAML names)"
    cause = error.__cause__ or error.__context__
    if type(error).__name__ == "DatasetGenerationError" and cause is not None:
        return f"its data could not be read ({first_line(cause)})"
    if isinstance(error, IndexError):  # lm-eval tries the first document while building the task
        return f"its first document does not fit the task ({type(error).__name__}: {first_line(error)})"
    return f"{type(error).__name__}: {first_line(error)}"


def yaml_syntax_problem(include_path: str | Path, tasks: list[str], any_task: bool = False) -> str | None:
    """The first YAML under include_path that does not parse and names one of `tasks` (any, when
    `any_task`), as "file line N: problem"; lm-eval skips such a file and then calls its task unknown."""
    import yaml
    from lm_eval.tasks._yaml_loader import load_yaml

    for path in sorted(Path(include_path).rglob("*.y*ml")):
        try:
            load_yaml(path, resolve_func=False, recursive=False)
        except (yaml.YAMLError, ValueError) as e:
            text = path.read_text(encoding="utf-8", errors="replace")
            if not any_task and not any(re.search(rf"\b{re.escape(t)}\b", text) for t in tasks):
                continue
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or first_line(e)
            return f"{path}{where}: {problem}"
    return None


def leaf_tasks(task_dict: Mapping[Any, Any]) -> Iterator[tuple[str, Any]]:
    """(name, task) of every task in lm-eval's nested {name or group: task or {...}} dict."""
    for key, value in task_dict.items():
        if isinstance(value, Mapping):
            yield from leaf_tasks(value)
        elif value is not None:
            yield str(getattr(value, "task_name", None) or key), value


def evaluated_count(total: int, limit: int | float | None) -> int:
    """How many documents lm-eval evaluates: the first `limit`, or ceil(limit * total) for a fraction."""
    if limit is None:
        return total
    return min(total, int(limit) if limit >= 1 else math.ceil(total * limit))


def check_task(name: str, task: Any, limit: int | float | None, num_fewshot: int | None = None) -> None:
    """The task's metrics, generation settings, few-shot pool and the documents that will be evaluated
    (num_fewshot: the count asked for; None: the task's own)."""
    config = task.config
    if config.process_results is None:
        unknown = [m for m, fn in getattr(task, "_metric_fn_list", {}).items() if fn is None]
        if unknown:
            names = ", ".join(map(str, unknown))
            raise UserError(f"task {name}: unknown metric(s) {names} in its metric_list")
    unknown = [m for m, fn in getattr(task, "_aggregation_list", {}).items() if fn is None]
    if unknown:
        raise UserError(f"task {name}: unknown aggregation for metric(s) {', '.join(map(str, unknown))}")
    _check_fewshot(name, task, config.num_fewshot if num_fewshot is None else num_fewshot)
    if config.output_type == "generate_until":
        generation_settings(config.generation_kwargs or {}, where=f"task {name}: generation_kwargs")
    docs = task.eval_docs
    if len(docs) == 0:
        raise UserError(f"task {name} has no documents to evaluate")
    for index in range(evaluated_count(len(docs), limit)):
        try:
            problem = _document_problem(task, docs[index])
        except UserError:
            raise
        except Exception as e:  # a template naming a missing field, a doc_to_* function that fails
            problem = f"{type(e).__name__}: {first_line(e)}"
        if problem:
            raise UserError(f"task {name}, document {index + 1}: {problem}")


def _check_fewshot(name: str, task: Any, count: int | None) -> None:
    """lm-eval draws the examples from the few-shot documents (one more when they are the evaluated
    split, to leave the document itself out): fewer than that is a ValueError mid-evaluation."""
    if count is not None:
        check_int(f"task {name}: num_fewshot", count, minimum=0)
    if not count:
        return
    pool = task.fewshot_docs()
    same = getattr(getattr(task, "fewshot_cfg", None), "split", None) == task.config.test_split
    available = (len(pool) if pool is not None else 0) - (1 if same else 0)
    if available < count:
        raise UserError(f"task {name}: {count}-shot needs {count} few-shot documents, its few-shot split "
                        f"has {max(available, 0)}{' besides the document evaluated' if same else ''}")


def _document_problem(task: Any, doc: Any) -> str | None:
    kind = task.config.output_type
    text = task.doc_to_text(doc)
    target = task.doc_to_target(doc)
    if kind == "multiple_choice":
        choices = task.doc_to_choice(doc)
        if not isinstance(choices, list) or not choices:
            return f"its choices are {choices!r}, not a non-empty list"
        empty = [i for i, c in enumerate(choices) if not isinstance(c, str) or not c]
        if empty:
            return f"answer choice {empty[0]} is empty ({choices[empty[0]]!r})"
        if isinstance(text, int) and not isinstance(text, bool):  # several contexts, one continuation
            return None if 0 <= text < len(choices) else f"context index {text} is out of range"
        for gold in target if isinstance(target, list) else [target]:
            if isinstance(gold, bool) or not isinstance(gold, (int, str)):
                return f"its answer {gold!r} is neither a choice index nor a choice"
            if isinstance(gold, int) and not 0 <= gold < len(choices):
                return f"answer index {gold} is out of range for {len(choices)} choices"
            if isinstance(gold, str) and gold not in choices:
                return f"answer {gold!r} is not one of its choices"
    elif kind == "loglikelihood_rolling":
        if not str(target).split():
            return "it has no text to score"
    elif kind == "loglikelihood" and str(target) == "":
        return "its continuation (the target) is empty"
    return None
