"""Benchmark evaluation through lm-evaluation-harness (the `eval` extra: pip install "spectralds[eval]").

`evaluate_models` runs lm-eval on several checkpoints or modules; `format_table` / `write_results` /
`log_tensorboard` present the side-by-side table. Importing `spectralds.evaluation.lm_eval_backend`
registers the "spectralds" model with lm-eval.
"""

from spectralds.evaluation.run import evaluate_models, offline
from spectralds.evaluation.table import format_table, log_tensorboard, rows, write_results

__all__ = ["evaluate_models", "format_table", "log_tensorboard", "rows", "offline", "write_results"]
