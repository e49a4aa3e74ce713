"""StageReport: one row (layers, LDS states, val loss, decode ms/token) per stage of a distill-and-prune run.

Put one before and after each layer-changing callback; Lightning calls `on_train_end` in list order:

    StageReport("STU"), STUToLDSDistillation(...), StageReport("LDS"),
    LayerAdaptiveStatePruning(ratio=0.5), StageReport("LDS pruned 50%", print_table=True)

The last one prints the table of every StageReport, logs it and writes report.md / report.json to the
run's log dir.
"""

from __future__ import annotations

import os
import re
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from spectralds.callbacks._common import log_scalars, run_validation
from spectralds.callbacks.stage_metrics import decode_ms_per_token, fingerprint, model_row, vocab_size
from spectralds.callbacks.stage_table import format_table, write_report
from spectralds.errors import UserError, check_int


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
        eval_tasks: lm-evaluation-harness tasks to run on this stage's model (needs the `eval` extra;
            data-parallel under DDP: the same numbers as one process); the printing StageReport then
            also prints their side-by-side table (with the difference of the second row from the first)
            and writes it to <log_dir>/eval.md and eval.json.
        eval_include_path: a folder of extra task YAMLs (lm-eval's include_path).
        eval_num_fewshot / eval_limit / eval_batch_size: lm-eval's few-shot count, documents per task,
            requests per forward pass.
        eval_offline: evaluate with the Hugging Face hub off (restored after), so a task whose data is not
            local fails in one line instead of downloading.
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

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # The task names against lm-eval's index (the tasks are not built): an unknown one is refused
        # before the first step, not after the whole training.
        if stage == "fit" and self.eval_tasks:
            from spectralds.evaluation.run import task_manager

            try:
                task_manager(self.eval_tasks, self.eval_include_path)
            except UserError as e:
                raise UserError(f"StageReport {self.label!r} eval_tasks: {e}") from None

    # ---- val loss: reuse the last validation when it saw exactly these weights ----------------------
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:  # the sanity check runs only a few batches
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            self._last_val = (fingerprint(pl_module), metrics)

    def _val_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        last = self._last_val
        fresh = last is not None and last[0] == fingerprint(pl_module) and self.monitor in last[1]
        # Every rank must take the same branch: validation is collective under DDP.
        if trainer.strategy.reduce_boolean_decision(fresh, all=True):
            return last[1]
        return run_validation(trainer)

    # ---- the row ----------------------------------------------------------------------------------
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = self._val_metrics(trainer, pl_module)
        self.row = {
            **model_row(self.label, pl_module),
            "val_loss": metrics.get(self.monitor),
            "val_batches": int(sum(trainer.num_val_batches)) if trainer.num_val_batches else 0,
            "decode_ms_per_token": None,
        }
        if trainer.is_global_zero:  # no collectives in decoding; the other ranks need not wait for it
            self.row.update(self._time_decode(trainer, pl_module))
        if self.eval_tasks:  # under DDP every rank scores its share of the documents (lm-eval's split)
            self.eval_results = self._evaluate(trainer, pl_module)
        if self.print_table:
            self._report(trainer)

    def _time_decode(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        seq_len, vocab = getattr(pl_module, "seq_len", None), vocab_size(pl_module)
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
        from contextlib import nullcontext

        from spectralds.evaluation import evaluate_models, offline
        from spectralds.evaluation.quiet import quiet_lm_eval

        hparams = getattr(trainer.datamodule, "hparams", {}) if trainer.datamodule is not None else {}
        # offline and quiet as `spectralds eval` is; the rest of the run is left as it was
        with offline() if self.eval_offline else nullcontext(), quiet_lm_eval():
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
        print(f"wrote {' and '.join(write_report(log_dir, rows, self.monitor))}", flush=True)
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
