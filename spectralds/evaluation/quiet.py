"""lm-eval without its chatter: what `spectralds eval` and an in-run StageReport evaluation both use.

lm-eval logs a notice per task and metric (about 25 lines a stage for the three local tasks) that
would bury the table, and each `simple_evaluate` probes for a git commit with `git describe`, whose
"fatal: not a git repository" goes straight to the terminal when run outside a repository. Both are
silenced inside `quiet_lm_eval` only, and restored after it.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

# lm_eval.evaluator imports it by name and records its result in the results it returns (we don't
# keep that field); tests/evaluation/test_quiet_lm_eval.py checks that it is still there.
GIT_PROBE = "get_git_commit_hash"


def _quiet_git_commit_hash() -> str | None:
    """lm-eval's probe (`lm_eval.loggers.utils.get_git_commit_hash`) with git's stderr discarded."""
    from lm_eval.loggers.utils import get_commit_from_path

    try:
        out = subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL)  # noqa: S607
        return out.strip().decode()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return get_commit_from_path(os.getcwd())


@contextmanager
def quiet_lm_eval(level: str = "ERROR") -> Iterator[None]:
    """Inside the block, lm-eval logs only at `level` and above and its git probe prints nothing."""
    import lm_eval.evaluator

    logger = logging.getLogger("lm_eval")
    saved_level, saved_probe = logger.level, getattr(lm_eval.evaluator, GIT_PROBE)
    logger.setLevel(level)
    setattr(lm_eval.evaluator, GIT_PROBE, _quiet_git_commit_hash)
    try:
        yield
    finally:
        logger.setLevel(saved_level)
        setattr(lm_eval.evaluator, GIT_PROBE, saved_probe)
