"""Bad input on the training side: each is one `spectralds: error:` line (exit 2, no traceback), raised
before or at the step that meets it, and no file that existed before the run changes."""

import hashlib
from pathlib import Path

import pytest
from cli_helpers import one_line_error

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "assets" / "configs" / "tiny_lm.yaml")
CORPUS = ROOT / "tests" / "assets" / "data" / "corpus"
DISTILL = "--trainer.callbacks+=spectralds.callbacks.STUToLDSDistillation"
PRUNE = "--trainer.callbacks+=spectralds.callbacks.LayerAdaptiveStatePruning"
ADAMW, SGD = "--model.init_args.optimizer=torch.optim.AdamW", "--model.init_args.optimizer=torch.optim.SGD"
OPT = "--model.init_args.optimizer.init_args."
SCHED = "--model.init_args.lr_scheduler"
TOTAL = f"{SCHED}.init_args.total_steps=10"

pytestmark = pytest.mark.usefixtures("cli_env")

# (id, extra arguments, the start of the expected error line after "spectralds: error: ")
CASES = [
    ("nonfinite-policy-typo", ["--model.init_args.nonfinite_loss=ignroe"], "nonfinite_loss must be one of"),
    ("negative-lr", [ADAMW, f"{OPT}lr=-1"], "invalid optimizer arguments: Invalid learning rate: -1.0"),
    ("adam-beta-above-1", [ADAMW, f"{OPT}betas=[0.9, 1.5]"], "invalid optimizer arguments: Invalid beta"),
    ("negative-momentum", [SGD, f"{OPT}lr=0.1", f"{OPT}momentum=-1"], "invalid optimizer arguments"),
    (
        "warmup-negative",
        [f"{SCHED}=spectralds.models.WarmupCosineLR", f"{SCHED}.init_args.warmup_steps=-1", TOTAL],
        "need 0 <= warmup_steps < total_steps",
    ),
    (
        "warmup-longer-than-schedule",
        [f"{SCHED}=spectralds.models.WarmupCosineLR", f"{SCHED}.init_args.warmup_steps=20", TOTAL],
        "need 0 <= warmup_steps < total_steps, got 20 and 10",
    ),
    (
        "steplr-step-size-0",
        [f"{SCHED}=torch.optim.lr_scheduler.StepLR", f"{SCHED}.init_args.step_size=0"],
        "lr_scheduler StepLR failed at global step 1",
    ),
    ("dropout-above-1", ["--model.init_args.dropout=2"], "dropout must be <= 1, got 2.0"),
    ("data-longer-than-model", ["--data.init_args.seq_len=64"], "data seq_len 64 exceeds the model's"),
    (
        "vocab-below-tokenizer",
        ["--model.init_args.vocab_size=100"],
        "model vocab_size 100 is smaller than the tokenizer's 256 tokens",
    ),
    ("batch-size-0", ["--data.init_args.batch_size=0"], "batch_size must be at least 1, got 0"),
    ("val-fraction-above-1", ["--data.init_args.val_fraction=1.5"], "val_fraction must be strictly between"),
    ("num-workers-negative", ["--data.init_args.num_workers=-1"], "num_workers must be non-negative"),
    ("unknown-tokenizer", ["--data.init_args.tokenizer=nosuch"], "unknown tokenizer 'nosuch'"),
    ("num-filters-0", ["--model.init_args.num_filters=0"], "num_filters must be >= 1, got 0"),
    ("heads-do-not-split-dim", ["--model.init_args.layer_kwargs={attn: {num_heads: 3}}"], "dim 16 must"),
    (
        "distill-at-step-and-epoch",
        [DISTILL, "--trainer.callbacks.at_step=1", "--trainer.callbacks.at_epoch=1"],
        "give at_step or at_epoch, not both",
    ),
    (
        "distill-without-stu",
        ["--model.init_args.layer_pattern=[attn]", DISTILL],
        "STUToLDSDistillation: no STU layer in LanguageModel to distill",
    ),
    (
        "prune-ratio-above-1",
        [PRUNE, "--trainer.callbacks.ratio=1.5"],
        "LayerAdaptiveStatePruning: ratio must be in (0, 1), got 1.5",
    ),
    (
        "diverging-lr-stops-naming-the-step",
        [SGD, f"{OPT}lr=1e30", "--trainer.enable_checkpointing=false", "--trainer.limit_val_batches=0"],
        "non-finite training loss (nan) at global step 2; stopping",
    ),
]


def _hashes(paths: list[Path]) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


@pytest.fixture
def earlier_run(tmp_path) -> list[Path]:
    """Files a previous run left where this one logs (and the inputs it reads)."""
    version = tmp_path / "runs" / "default" / "version_0"
    (version / "checkpoints").mkdir(parents=True)
    (version / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run's checkpoint")
    (version / "config.yaml").write_text("seed_everything: 1\n")
    (version / "hparams.yaml").write_text("model/init_args/dim: 16\n")
    return [p for p in (*tmp_path.rglob("*"), *CORPUS.rglob("*"), Path(TINY)) if p.is_file()]


@pytest.mark.parametrize("args, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_training_input_is_one_line_and_changes_no_file(capsys, earlier_run, args, expected):
    before = _hashes(earlier_run)
    base = ["fit", "--config", TINY, f"--data.source={CORPUS}", "--trainer.max_steps=10"]
    err = one_line_error(capsys, [*base, *args])
    assert err.startswith(f"spectralds: error: {expected}"), err
    assert _hashes(earlier_run) == before
