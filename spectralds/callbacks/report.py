"""StageReport: one row (layers, LDS states, val loss, decode ms/token) per stage of a distill-and-prune run.

Put one before and after each layer-changing callback; Lightning calls `on_train_end` in list order:

    StageReport("STU"), STUToLDSDistillation(...), StageReport("LDS"),
    LayerAdaptiveStatePruning(ratio=0.5), StageReport("LDS pruned 50%", print_table=True)

The last one prints the table of every StageReport, logs it and writes report.md / report.json to the
run's log dir.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections import Counter
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from spectralds.callbacks._common import log_scalars, run_validation
from spectralds.errors import UserError, check_int
from spectralds.generate import decode_loop
from spectralds.layers import SequenceLayer, layer_specs
from spectralds.layers.lds import LDS

COLUMNS = ("model", "layers", "LDS states", "per layer", "val loss", "decode ms/token")


class StageReport(Callback):
    """Measure the model as it is at the end of training (after the callbacks listed before this one).

    Args:
        label: the row's name in the table.
        print_table: print the rows of all StageReports measured so far (rank 0), log them and write
            <log_dir>/report.md and report.json.
        monitor: the validation metric reported as "val loss".
        decode_tokens: time at most this many greedy decode steps (batch 1) after the prompt.
        prompt_len: prompt length (None: half the model's seq_len); prompt + decode_tokens fit seq_len.
        repeats: timed decodes after one warm-up; the fastest counts (the least disturbed by other load).
        eval_tasks: lm-evaluation-harness tasks to run on this stage's model (needs the `eval` extra);
            the printing StageReport then also prints their side-by-side table (with the difference of
            the second row from the first) and writes it to <log_dir>/eval.md and eval.json.
        eval_include_path: a folder of extra task YAMLs (lm-eval's include_path).
        eval_num_fewshot / eval_limit / eval_batch_size: lm-eval's few-shot count, documents per task,
            requests per forward pass.
        eval_offline: set the Hugging Face offline flags for this process before evaluating, so a task
            whose data is not local fails in one line instead of downloading.
    """

    def __init__(
        self,
        label: str,
        print_table: bool = False,
        monitor: str = "val/loss",
        decode_tokens: int = 64,
        prompt_len: int | None = None,
        repeats: int = 3,
        eval_tasks: list[str] | None = None,
        eval_include_path: str | None = None,
        eval_num_fewshot: int | None = 0,
        eval_limit: float | None = None,
        eval_batch_size: int = 8,
        eval_offline: bool = True,
    ) -> None:
        if min(decode_tokens, repeats) < 1 or (prompt_len is not None and prompt_len < 1):
            raise UserError("decode_tokens, repeats and prompt_len must be positive")
        if eval_tasks:
            _check_eval_args(eval_include_path, eval_batch_size)
        self.eval_tasks, self.eval_include_path = list(eval_tasks or []), eval_include_path
        self.eval_num_fewshot, self.eval_limit = eval_num_fewshot, eval_limit
        self.eval_batch_size = eval_batch_size
        self.eval_offline = eval_offline
        self.eval_results: dict[str, Any] | None = None
        self.label, self.print_table, self.monitor = label, print_table, monitor
        self.decode_tokens, self.prompt_len, self.repeats = decode_tokens, prompt_len, repeats
        self.row: dict[str, Any] | None = None
        self._last_val: tuple[tuple, dict[str, float]] | None = None

    @property
    def state_key(self) -> str:  # several StageReports in one Trainer: one checkpoint entry each
        return self._generate_state_key(label=self.label)

    # ---- val loss: reuse the last validation when it saw exactly these weights ----------------------
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:  # the sanity check runs only a few batches
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            self._last_val = (_fingerprint(pl_module), metrics)

    def _val_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        last = self._last_val
        fresh = last is not None and last[0] == _fingerprint(pl_module) and self.monitor in last[1]
        # Every rank must take the same branch: validation is collective under DDP.
        if trainer.strategy.reduce_boolean_decision(fresh, all=True):
            return last[1]
        return run_validation(trainer)

    # ---- the row ----------------------------------------------------------------------------------
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = self._val_metrics(trainer, pl_module)
        lds = [m.state_dim for m in pl_module.modules() if isinstance(m, LDS)]
        layers = [m for m in pl_module.modules() if isinstance(m, SequenceLayer)]
        decode = [m.decode_method for m in layers if m.decode_methods]  # STU layers: how they decode
        self.row = {
            "model": self.label,
            "layers": _layer_summary(pl_module),
            "lds_states": sum(lds) if lds else None,
            "lds_states_per_layer": lds,
            "val_loss": metrics.get(self.monitor),
            "val_batches": int(sum(trainer.num_val_batches)) if trainer.num_val_batches else 0,
            "decode_ms_per_token": None,
            "decode": sorted(set(decode)),
        }
        if trainer.is_global_zero:  # no collectives in decoding; the other ranks need not wait for it
            self.row.update(self._time_decode(trainer, pl_module))
            if self.eval_tasks:
                self.eval_results = self._evaluate(trainer, pl_module)
        if self.print_table:
            self._report(trainer)

    def _time_decode(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        seq_len, vocab = getattr(pl_module, "seq_len", None), _vocab_size(pl_module)
        if not (hasattr(pl_module, "prefill") and hasattr(pl_module, "step") and seq_len and vocab):
            return {}
        prompt_len = min(self.prompt_len or max(1, seq_len // 2), seq_len - 1)
        tokens = min(self.decode_tokens, seq_len - prompt_len)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with trainer.precision_plugin.forward_context():
                ms = decode_ms_per_token(pl_module, vocab, prompt_len, tokens, self.repeats)
        finally:
            pl_module.train(was_training)
        return {"decode_ms_per_token": ms, "prompt_len": prompt_len, "decode_tokens": tokens}

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        from spectralds.evaluation import evaluate_models, set_offline

        if self.eval_offline:
            set_offline()
        hparams = getattr(trainer.datamodule, "hparams", {}) if trainer.datamodule is not None else {}
        return evaluate_models(
            {self.label: pl_module}, self.eval_tasks, include_path=self.eval_include_path,
            num_fewshot=self.eval_num_fewshot, batch_size=self.eval_batch_size, limit=self.eval_limit,
            tokenizer=hparams.get("tokenizer"), device=str(pl_module.device),
        )

    # ---- the table --------------------------------------------------------------------------------
    def _report(self, trainer: L.Trainer) -> None:
        rows = [cb.row for cb in trainer.callbacks if isinstance(cb, StageReport) and cb.row is not None]
        scalars = {}
        for row in rows:
            slug = re.sub(r"[^a-z0-9]+", "_", row["model"].lower()).strip("_")
            for key in ("val_loss", "decode_ms_per_token", "lds_states"):
                if row[key] is not None:
                    scalars[f"report/{slug}/{key}"] = float(row[key])
        log_scalars(trainer, scalars)
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        table = format_table(rows)
        print(table, flush=True)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                experiment.add_text("report/table", table, global_step=trainer.global_step)
        os.makedirs(log_dir, exist_ok=True)
        with open(os.path.join(log_dir, "report.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(log_dir, "report.json"), "w") as f:
            json.dump({"split": "validation", "metric": self.monitor, "rows": rows}, f, indent=2)
        print(f"wrote {os.path.join(log_dir, 'report.md')} and report.json", flush=True)
        evaluated = [cb.eval_results for cb in trainer.callbacks if isinstance(cb, StageReport)]
        if any(evaluated):
            self._report_eval([r for r in evaluated if r], log_dir)

    def _report_eval(self, results: list[dict[str, Any]], log_dir: str) -> None:
        from spectralds.evaluation import format_table as eval_table
        from spectralds.evaluation import write_results

        merged = {**results[0], "models": {k: v for r in results for k, v in r["models"].items()}}
        print(eval_table(merged), flush=True)
        write_results(merged, os.path.join(log_dir, "eval.json"), os.path.join(log_dir, "eval.md"))
        print(f"wrote {os.path.join(log_dir, 'eval.md')} and eval.json", flush=True)

    def state_dict(self) -> dict:
        return {"row": self.row, "eval_results": self.eval_results}

    def load_state_dict(self, state_dict: dict) -> None:
        self.row = state_dict.get("row")
        self.eval_results = state_dict.get("eval_results")


def _check_eval_args(include_path: str | None, batch_size: int) -> None:
    """Before training, not after it: lm-eval installed, the task folder there, a usable batch size."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        hint = "pip install 'spectralds[eval]'"
        raise UserError(f"StageReport eval_tasks needs lm-evaluation-harness: {hint}") from e
    if include_path is not None and not os.path.isdir(include_path):
        raise UserError(f"StageReport eval_include_path {include_path} is not a folder")
    check_int("StageReport eval_batch_size", batch_size, minimum=1)


@torch.inference_mode()
def decode_ms_per_token(
    model: torch.nn.Module, vocab_size: int, prompt_len: int, tokens: int, repeats: int = 3
) -> float:
    """Milliseconds per greedy `model.step` (batch 1) after `prefill` of a random prompt; best of repeats."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(vocab_size, (1, prompt_len), generator=gen).to(device)
    best = math.inf
    for run in range(repeats + 1):  # run 0 warms up (allocations, cached decoding tables)
        logits, states = model.prefill(prompt)
        _sync(device)
        start = time.perf_counter()
        decode_loop(model.step, logits, states, tokens, lambda i, logits: logits.argmax(dim=-1))
        _sync(device)
        if run:
            best = min(best, time.perf_counter() - start)
    return best / tokens * 1e3


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


def _fingerprint(module: torch.nn.Module) -> tuple:
    """Changes whenever a weight is replaced, reshaped or modified in place (optimizer steps, swaps)."""
    return tuple(
        (name, tuple(t.shape), t.data_ptr(), t._version)
        for name, t in module.state_dict(keep_vars=True).items()
    )


def _layer_summary(module: torch.nn.Module) -> str:
    counts = Counter(spec["name"] for spec in layer_specs(module).values())
    return " + ".join(f"{n} {name}" for name, n in counts.items()) or type(module).__name__


def _vocab_size(module: torch.nn.Module) -> int | None:
    vocab = getattr(module, "hparams", {}).get("vocab_size")
    embed = getattr(module, "embed", None)
    return vocab or getattr(embed, "num_embeddings", None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
