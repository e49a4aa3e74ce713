"""Suite-wide settings and fixtures."""

import sys

import pytest
import torch

# One intra-op thread per test process: CI runs two xdist workers on two cores, and with torch's default
# threads per worker the idle threads spin while others hold the cores (a tiny fit took 35 s instead of 4).
torch.set_num_threads(1)


@pytest.fixture
def cli_env(tmp_path, monkeypatch):
    """A CLI run in its own directory and cache, without pytest's own arguments in sys.argv."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["spectralds"])  # LightningCLI warns when pytest's args are there
    monkeypatch.setenv("SPECTRALDS_CACHE_DIR", str(tmp_path / "cache"))
