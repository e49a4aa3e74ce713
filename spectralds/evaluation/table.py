"""The side-by-side table of `evaluate_models` results: one row per model, one column per task metric,
the average of the higher-is-better metrics, and a difference row (second model minus first)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from spectralds.errors import UserError
from spectralds.evaluation.outputs import REPORT_MARK, report_path, run_name
from spectralds.io import atomic_write


def columns(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(task, metric) pairs in task order, each metric as lm-eval reported it for the first model."""
    models = list(results["models"].values())
    found: list[tuple[str, str]] = []
    for task in results["tasks"]:
        for model in models:
            for metric in model["results"].get(task, {}):
                if (task, metric) not in found:
                    found.append((task, metric))
    return found


def _higher_is_better(results: dict[str, Any], task: str, metric: str) -> bool:
    for model in results["models"].values():
        flag = model.get("higher_is_better", {}).get(task, {}).get(metric)
        if flag is not None:
            return bool(flag)
    return False


def rows(results: dict[str, Any]) -> tuple[list[str], list[list[float]]]:
    """Header and one row of numbers per model, then the difference row when there are two or more.

    The average covers the higher-is-better metrics (accuracies, exact match): averaging them with
    perplexities would mean nothing. NaN marks a metric a model does not have.
    """
    cols = columns(results)
    averaged = [i for i, (task, metric) in enumerate(cols) if _higher_is_better(results, task, metric)]
    header = [f"{task}/{metric}" for task, metric in cols] + (["avg"] if averaged else [])
    table = []
    for model in results["models"].values():
        values = [model["results"].get(task, {}).get(metric, math.nan) for task, metric in cols]
        if averaged:
            values.append(sum(values[i] for i in averaged) / len(averaged))
        table.append(values)
    if len(table) >= 2:
        table.append([b - a for a, b in zip(table[0], table[1], strict=True)])
    return header, table


def labels(results: dict[str, Any]) -> list[str]:
    names = list(results["models"])
    return names + ([f"{names[1]} - {names[0]}"] if len(names) >= 2 else [])


def format_table(results: dict[str, Any], markdown: bool = False) -> str:
    """Plain aligned text (markdown=False) or a markdown table of `rows`."""
    header, table = rows(results)
    names = labels(results)
    cells = [[_number(v) for v in row] for row in table]
    if markdown:
        lines = ["| model | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(row) + " |" for name, row in zip(names, cells, strict=True)]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    first = max(len("model"), *(len(n) for n in names))
    lines = ["  ".join(["model".ljust(first)] + [h.rjust(w) for h, w in zip(header, widths, strict=True)])]
    for name, row in zip(names, cells, strict=True):
        lines.append("  ".join([name.ljust(first)] + [c.rjust(w) for c, w in zip(row, widths, strict=True)]))
    return "\n".join(lines)


def report_markdown(results: dict[str, Any]) -> str:
    shots = results.get("num_fewshot") or {}
    by_count: dict[Any, list[str]] = {}
    for task, count in shots.items():
        by_count.setdefault("task default" if count is None else count, []).append(task)
    setting = "; ".join(f"{count}-shot: {', '.join(tasks)}" for count, tasks in by_count.items())
    if results.get("limit"):
        setting += f", first {results['limit']} documents per task"
    return f"{REPORT_MARK}\n# lm-eval results ({setting})\n\n{format_table(results, markdown=True)}\n"


def write_results(
    results: dict[str, Any], json_path: str | Path, markdown_path: str | Path | None = None
) -> None:
    """The table as markdown (default: the JSON's name with suffix .md), then the results as JSON, each
    atomically: the JSON is written last, so a failure leaves no complete-looking results file."""
    json_path = Path(json_path)
    markdown_path = Path(markdown_path) if markdown_path else report_path(json_path)
    if markdown_path.resolve() == json_path.resolve():
        raise UserError(f"the JSON and the markdown report would both be {json_path}")
    atomic_write(markdown_path, report_markdown(results).encode())
    atomic_write(json_path, json.dumps(results, indent=2, default=str).encode())


def log_tensorboard(results: dict[str, Any], log_dir: str | Path) -> None:
    """Every metric as a scalar eval/<task>/<metric> under one run per model, and the table as text."""
    from torch.utils.tensorboard import SummaryWriter

    header, table = rows(results)
    for name, row in zip(labels(results)[: len(results["models"])], table, strict=False):
        with SummaryWriter(str(Path(log_dir) / run_name(name))) as writer:
            for column, value in zip(header, row, strict=True):
                if not math.isnan(value):
                    writer.add_scalar(f"eval/{column}", value, 0)
    with SummaryWriter(str(log_dir)) as writer:
        writer.add_text("eval/table", format_table(results, markdown=True), 0)


def _number(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4e}"  # perplexities of barely trained models
