"""A fit prints our lines and Lightning's progress, not third-party banners and deprecation notices
(spectralds/cli_quiet.py), and the filters hide nothing else."""

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

from spectralds.cli_quiet import LIGHTNING_INFO_LOGGERS, silence_third_party_noise

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "tests" / "assets" / "configs" / "tiny_lm.yaml")
CORPUS = str(ROOT / "tests" / "assets" / "data" / "corpus")
# What a tiny fit printed before the filters, besides "Seed set to 0", "GPU available: ..." and
# "`Trainer.fit` stopped: ...": none of it is about the user's run.
NOISE = (
    "'set_vital' is deprecated",
    'torch.set_vital("Dataloader", "enabled", "True")',
    "`isinstance(treespec, LeafSpec)` is deprecated",
    "💡 Tip:",
    "litlogger",
    "TPU available: False, using: 0 TPU cores",
)


def test_a_tiny_fit_prints_no_third_party_noise(tmp_path):
    """A fresh process (each warning prints once per process, and pytest would capture them in-process)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SPECTRALDS_CACHE_DIR": str(tmp_path / "cache")}
    args = ["fit", "--config", TINY, f"--data.source={CORPUS}", "--trainer.max_steps=2"]
    done = subprocess.run([sys.executable, "-m", "spectralds", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    printed = [line for line in done.stderr.splitlines() if any(noise in line for noise in NOISE)]
    assert printed == []
    assert "`Trainer.fit` stopped: `max_steps=2` reached." in done.stderr  # Lightning's own line stays
    assert "GPU available:" in done.stderr


def test_the_filters_keep_every_other_warning_and_log_line(caplog):
    with warnings.catch_warnings(record=True) as caught:
        silence_third_party_noise()
        silence_third_party_noise()  # idempotent
        warnings.warn("our own warning", UserWarning, stacklevel=1)
        warnings.warn("'set_vital' is deprecated, said by us", UserWarning, stacklevel=1)  # not torchdata's
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == [
        "our own warning", "'set_vital' is deprecated, said by us", "something else is deprecated"]
    logger = logging.getLogger(LIGHTNING_INFO_LOGGERS[0])
    assert sum(f.__class__.__name__ == "_DropNoise" for f in logger.filters) == 1
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("GPU available: False, used: False")
        logger.info("💡 Tip: install our cloud")
        logger.info("TPU available: False, using: 0 TPU cores")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]
