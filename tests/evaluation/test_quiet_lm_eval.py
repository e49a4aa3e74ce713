"""lm-eval's chatter stays off the terminal in `spectralds eval` and in a run's StageReport evaluation
(spectralds/evaluation/quiet.py), and everything is as it was after."""

import logging
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("lm_eval")
import lm_eval.evaluator  # noqa: E402
import lm_eval.loggers.utils  # noqa: E402

from spectralds.callbacks import StageReport  # noqa: E402
from spectralds.evaluation.quiet import GIT_PROBE, quiet_lm_eval  # noqa: E402
from spectralds.models import LanguageModel  # noqa: E402

ROOT = Path(__file__).parents[2]
TASKS_DIR = ROOT / "spectralds" / "evaluation" / "tasks"


@pytest.fixture
def outside_git(tmp_path, monkeypatch):
    """A working directory in no git repository (git stops looking above tmp_path)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))


def test_lm_eval_still_probes_git_where_we_replace_it():
    """An lm-eval upgrade that renames or stops using the probe fails here, not silently."""
    assert getattr(lm_eval.evaluator, GIT_PROBE) is lm_eval.loggers.utils.get_git_commit_hash


def test_the_git_probe_says_nothing_outside_a_repository(outside_git, capfd):
    assert lm_eval.loggers.utils.get_git_commit_hash() is None
    assert "fatal: not a git repository" in capfd.readouterr().err  # lm-eval's own probe, as users saw it
    with quiet_lm_eval():
        assert getattr(lm_eval.evaluator, GIT_PROBE)() is None
    assert capfd.readouterr().err == ""
    assert getattr(lm_eval.evaluator, GIT_PROBE) is lm_eval.loggers.utils.get_git_commit_hash  # restored


def test_the_git_probe_still_finds_a_commit_inside_a_repository(monkeypatch):
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    monkeypatch.chdir(ROOT)
    with quiet_lm_eval():
        assert getattr(lm_eval.evaluator, GIT_PROBE)() == lm_eval.loggers.utils.get_git_commit_hash()


def test_lm_eval_logs_only_errors_inside_and_its_level_is_restored():
    logger = logging.getLogger("lm_eval")
    before = logger.level
    with quiet_lm_eval():
        assert not logging.getLogger("lm_eval.tasks").isEnabledFor(logging.WARNING)
        assert logging.getLogger("lm_eval.tasks").isEnabledFor(logging.ERROR)
    with quiet_lm_eval("INFO"):
        assert logger.isEnabledFor(logging.INFO)
    assert logger.level == before


def test_a_stage_report_evaluation_is_quiet(outside_git, caplog, capfd):
    """The in-run path: no lm-eval notice (a dozen a stage before) and no git message."""
    model = LanguageModel(vocab_size=256, dim=16, num_layers=1, layer_pattern=["stu"], seq_len=64,
                          num_filters=4)
    report = StageReport("STU", eval_tasks=["spectralds_mc", "spectralds_ppl"],
                         eval_include_path=str(TASKS_DIR), eval_limit=2)
    with caplog.at_level(logging.DEBUG):
        results = report._evaluate(SimpleNamespace(datamodule=None), model)
    assert set(results["models"]["STU"]["results"]) == {"spectralds_mc", "spectralds_ppl"}
    assert [r.getMessage() for r in caplog.records if r.name.startswith("lm_eval")] == []
    assert "fatal:" not in capfd.readouterr().err
