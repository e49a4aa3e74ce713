"""Run by tests/evaluation/test_eval_ddp.py: a 2-process CPU DDP run (gloo) of a tiny language model whose
StageReport evaluates on the three local lm-eval tasks, data-parallel.

`ddp_eval_worker.py OUT`: train a few steps, save OUT/final.ckpt at the end of training (the weights the
StageReport evaluates), then `StageReport(eval_tasks=...)` writes OUT/eval.md; afterwards every rank
evaluates the saved checkpoint again with per-document samples and writes what it got to
OUT/samples-rank<r>.json (every rank must return rank 0's gathered results).
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from spectralds.callbacks import StageReport
from spectralds.evaluation import evaluate_models
from spectralds.models import LanguageModel

TASKS = ["spectralds_mc", "spectralds_ppl", "spectralds_gen"]
TASKS_DIR = Path(__file__).parents[2] / "spectralds" / "evaluation" / "tasks"
LABEL = "hybrid"


class SaveAtEnd(L.Callback):
    """trainer.save_checkpoint at the end of training: every rank calls it, rank 0 writes."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        trainer.save_checkpoint(self.path)


def main(out: str) -> None:
    out_dir = Path(out)
    L.seed_everything(0)
    text = torch.tensor(list(b"The river bends twice before the mill. The kettle sings. " * 20))
    starts = torch.arange(0, 512, 16)
    windows = torch.stack([text[s : s + 65] for s in starts])
    data = DataLoader(TensorDataset(windows[:, :-1], windows[:, 1:]), batch_size=4)
    model = LanguageModel(vocab_size=256, dim=16, num_layers=2, layer_pattern=["stu_t", "attn"], seq_len=64,
                          num_filters=4, mlp_ratio=2.0)
    report = StageReport(LABEL, print_table=True, decode_tokens=2, repeats=1, eval_tasks=TASKS,
                         eval_include_path=str(TASKS_DIR), eval_batch_size=3)
    trainer = L.Trainer(
        callbacks=[SaveAtEnd(out_dir / "final.ckpt"), report], accelerator="cpu", devices=2, strategy="ddp",
        max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=str(out_dir),
    )
    trainer.fit(model, data)
    results = evaluate_models({LABEL: out_dir / "final.ckpt"}, TASKS, include_path=TASKS_DIR, num_fewshot=0,
                              batch_size=3, log_samples=True)
    (out_dir / f"samples-rank{trainer.global_rank}.json").write_text(json.dumps(results, default=str))


if __name__ == "__main__":
    main(sys.argv[1])
