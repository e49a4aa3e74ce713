"""DDP with 2 CPU processes (gloo): every rank makes the identical swap and prune, and stays in sync;
a non-finite loss on one rank is skipped, or stops the run, on every rank alike."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.slow  # two gloo processes, each importing Lightning and training: about 25 s on 2 cores
def test_two_ranks_swap_prune_and_train_identically(tmp_path):
    env = dict(os.environ, SPECTRALDS_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for tag in ("swap", "end"):
        rank0 = (tmp_path / f"{tag}-rank0.txt").read_text()
        rank1 = (tmp_path / f"{tag}-rank1.txt").read_text()
        assert rank0 == rank1
        assert "mixers.0.A " in rank0 and "M_phi_plus" in rank0  # LDS layers carrying the STU's M
    assert (tmp_path / "swap-rank0.txt").read_text() != (tmp_path / "end-rank0.txt").read_text()


NONFINITE_CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 2
  strategy: ddp
  max_steps: 5
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  limit_val_batches: 0
  callbacks:
    - class_path: ddp_worker.PoisonBatch
      init_args: {{step: 2, rank: 1}}
    - class_path: ddp_worker.StepChecksums
      init_args: {{out: {out}}}
model:
  class_path: spectralds.models.SequenceRegression
  init_args:
    {{d_in: 2, d_out: 2, dim: 8, num_layers: 1, seq_len: 16, num_filters: 4, nonfinite_loss: {policy}}}
data:
  class_path: spectralds.data.SyntheticLDSDataModule
  init_args: {{state_dim: 4, d_in: 2, d_out: 2, seq_len: 16, batch_size: 4, num_train: 64, num_val: 4}}
"""


def run_nonfinite(tmp_path: Path, policy: str) -> subprocess.CompletedProcess:
    config = tmp_path / "run.yaml"
    config.write_text(NONFINITE_CONFIG.format(out=tmp_path, policy=policy))
    env = dict(os.environ, SPECTRALDS_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    command = [sys.executable, str(WORKER), "cli", str(config)]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_nonfinite_loss_on_one_rank_is_skipped_on_both(tmp_path):
    result = run_nonfinite(tmp_path, "skip")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [(tmp_path / f"exit-rank{r}.txt").read_text() for r in range(2)] == ["0", "0"]
    ranks = [(tmp_path / f"steps-rank{r}.txt").read_text().splitlines() for r in range(2)]
    assert ranks[0] == ranks[1]  # the same weights on both ranks after every step
    steps = [line.split(": ", 1) for line in ranks[0]]
    assert [s for s, _ in steps] == [f"step {n}" for n in range(1, 6)]  # the run finished
    weights = [w for _, w in steps]
    # Rank 1's batch at global step 2 was NaN: no weight moved on either rank (AdamW's weight decay
    # included), and training went on.
    assert weights[2] == weights[1]
    assert len({weights[0], weights[1], weights[3], weights[4]}) == 4


@pytest.mark.slow
def test_a_nonfinite_loss_on_one_rank_stops_both_with_one_line(tmp_path):
    result = run_nonfinite(tmp_path, "stop")
    assert result.returncode == 2, result.stderr[-3000:]
    # One error from each rank (two processes writing to one pipe may interleave their newlines).
    pattern = r"spectralds: error: non-finite training loss (.+?) at global step (\d+); stopping"
    seen = re.findall(pattern, result.stderr)
    assert sorted(seen) == [("(nan)", "2"), ("on another rank", "2")], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert [(tmp_path / f"exit-rank{r}.txt").read_text() for r in range(2)] == ["2", "2"]
    assert not list(tmp_path.glob("steps-rank*.txt"))  # no rank reached the end of training
