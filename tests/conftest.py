"""Suite-wide settings and fixtures."""

import os
import shutil
import sys
import tempfile

import pytest
import torch

# Caches go to one temporary folder per test process, never the user's: run with HOME and XDG_CACHE_HOME
# pointed at an empty folder, the suite wrote spectralds' filters and fits (~/.cache/spectralds), Hugging
# Face datasets' copies of the local lm-eval tasks (~/.cache/huggingface/datasets; transformers' remote-code
# modules go under HF_HOME too) and matplotlib's font cache and config. Set before any test module imports
# datasets or matplotlib (they read these at import); child processes inherit them.
SESSION_CACHE = tempfile.mkdtemp(prefix="spectralds-tests-cache-")
os.environ.update({
    "XDG_CACHE_HOME": SESSION_CACHE,  # torch hub and anything else that follows the XDG convention
    "SPECTRALDS_CACHE_DIR": os.path.join(SESSION_CACHE, "spectralds"),
    "HF_HOME": os.path.join(SESSION_CACHE, "huggingface"),
    "MPLCONFIGDIR": os.path.join(SESSION_CACHE, "matplotlib"),
})
for _override in ("HF_DATASETS_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE",
                  "HF_MODULES_CACHE", "TORCH_HOME"):  # a user's own settings would win over the above
    os.environ.pop(_override, None)


def pytest_unconfigure(config):
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)

# One intra-op thread per test process: CI runs two xdist workers on two cores, and with torch's default
# threads per worker the idle threads spin while others hold the cores (a tiny fit took 35 s instead of 4).
torch.set_num_threads(1)


@pytest.fixture
def cli_env(tmp_path, monkeypatch):
    """A CLI run in its own directory and cache, without pytest's own arguments in sys.argv."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["spectralds"])  # LightningCLI warns when pytest's args are there
    monkeypatch.setenv("SPECTRALDS_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def steps_taken(monkeypatch) -> list[int]:
    """Counts the LanguageModel training steps of the runs in a test (a refused run takes none)."""
    from spectralds.models import LanguageModel

    taken: list[int] = []
    original = LanguageModel.training_step

    def counting(self, batch, batch_idx):
        taken.append(batch_idx)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(LanguageModel, "training_step", counting)
    return taken
