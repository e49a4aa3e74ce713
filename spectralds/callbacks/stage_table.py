"""StageReport's table and files: one row per stage (layers, LDS states, val loss, decode ms/token)."""

from __future__ import annotations

import json
import os
from typing import Any

from spectralds.io import atomic_write

COLUMNS = ("model", "layers", "LDS states", "per layer", "val loss", "decode ms/token")


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the rows and notes on what was measured."""
    cells = [
        [
            row["model"],
            row["layers"],
            "-" if row["lds_states"] is None else str(row["lds_states"]),
            "/".join(map(str, row["lds_states_per_layer"])) or "-",
            "-" if row["val_loss"] is None else f"{row['val_loss']:.4f}",
            "-" if row["decode_ms_per_token"] is None else f"{row['decode_ms_per_token']:.3f}",
        ]
        for row in rows
    ]
    widths = [max(len(c) for c in column) for column in zip(COLUMNS, *cells, strict=True)]
    right = [False, False, True, False, True, True]

    def line(values: list[str]) -> str:
        padded = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True)]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|" + "|".join("-" * (w + 1) + (":" if r else "-") for w, r in zip(widths, right, strict=True)) + "|"
    )
    lines = [line(list(COLUMNS)), rule, *(line(c) for c in cells), ""]
    batches = "/".join(str(b) for b in sorted({row["val_batches"] for row in rows}))
    lines.append(
        f"val loss: mean NLL per token (nats) on {batches} batches of the held-out validation split (the "
        "same windows for every row), measured after each stage."
    )
    timed = [row for row in rows if row["decode_ms_per_token"] is not None]
    if timed:
        decoders = sorted({d for row in timed for d in row["decode"]})
        how = f"; STU layers decode with {', '.join(decoders)}" if decoders else ""
        lines.append(
            f"decode: greedy, batch 1, {timed[0]['decode_tokens']} steps after a "
            f"{timed[0]['prompt_len']}-token prompt, fastest of the timed runs{how}."
        )
    return "\n".join(lines)


def write_report(log_dir: str, rows: list[dict[str, Any]], monitor: str) -> list[str]:
    """report.md (the table) and report.json (the rows) in `log_dir`, each written atomically; their paths."""
    md, js = os.path.join(log_dir, "report.md"), os.path.join(log_dir, "report.json")
    atomic_write(md, (format_table(rows) + "\n").encode())
    atomic_write(js, json.dumps({"split": "validation", "metric": monitor, "rows": rows}, indent=2).encode())
    return [md, js]
