"""DDP with 2 CPU processes (gloo): every rank makes the identical swap and prune, and stays in sync."""

import os
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("ddp_worker.py")


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
