"""Crash safety of checkpoints: kill -9 mid-epoch and resume, atomic saves, no NaN saves, bad files."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning
import pytest
import torch
from cli_helpers import one_line_error, run_cli

from spectralds.checkpoint_io import AtomicCheckpointIO, load_model
from spectralds.models import LanguageModel

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "assets" / "data" / "corpus"
TINY = str(ROOT / "tests" / "assets" / "configs" / "tiny_lm.yaml")

# The byte corpus (~2.2 kB, 80% train) gives 53 shuffled windows of 32 tokens: 7 batches of 8 per epoch.
# Checkpoints (and validation) every 3 steps; 21 steps are 3 epochs. The crashed run hangs (and is killed)
# before step 14, so it resumes from step 12: batch 5 of 7 of the second epoch.
RUN_CONFIG = """
seed_everything: 0
trainer:
  max_steps: 21
  val_check_interval: 3
  check_val_every_n_epoch: null
  limit_val_batches: 2
  log_every_n_steps: 1
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: logs, name: run}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: ckpts, save_last: true, every_n_train_steps: 3}}
{extra_callbacks}
model:
  class_path: spectralds.models.LanguageModel
  init_args:
    vocab_size: 256
    dim: 16
    num_layers: 2
    layer_pattern: [stu, attn]
    seq_len: 32
    num_filters: 4
    layer_kwargs: {{attn: {{num_heads: 2, window_size: 8}}}}
data:
  class_path: spectralds.data.TextDataModule
  init_args: {{source: {corpus}, seq_len: 32, batch_size: 8, val_fraction: 0.2}}
"""
HANG_CALLBACK = """
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class HangAt(Callback):
    '''Stands still at the start of the batch after `step` optimizer steps, for the test to kill.'''

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            Path(self.marker).write_text(str(batch_idx))
            time.sleep(600)
"""
HANG_STEP, RESUME_STEP, MAX_STEPS = 13, 12, 21


pytestmark = pytest.mark.usefixtures("cli_env")



def spectralds(args: list[str], cwd: Path, env: dict[str, str], log: Path, wait_for_go: bool = False):
    """`spectralds <args>` in a fresh process (the console script's `main`); with `wait_for_go` it imports
    everything first, then waits for a line on stdin (so the slow imports overlap other work)."""
    go = "sys.stdin.readline(); " if wait_for_go else ""
    command = [sys.executable, "-c", f"import sys; from spectralds.cli import main; {go}main()", *args]
    with open(log, "wb") as out:  # a file, not a pipe, so a chatty child never blocks
        return subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=out, stderr=out)


def last_val_loss(run_dir: Path) -> float:
    versions = sorted((run_dir / "logs" / "run").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    with open(versions[-1] / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("val/loss")]
    return float(rows[-1]["val/loss"])


@pytest.mark.slow  # two fresh `spectralds` processes: importing Lightning alone takes seconds
def test_kill_mid_epoch_and_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    base = tmp_path / "run.yaml"
    base.write_text(RUN_CONFIG.format(corpus=CORPUS, extra_callbacks=""))
    marker = tmp_path / "hanging"
    crash = tmp_path / "crash.yaml"
    hang = f"    - class_path: hang.HangAt\n      init_args: {{step: {HANG_STEP}, marker: {marker}}}"
    crash.write_text(RUN_CONFIG.format(corpus=CORPUS, extra_callbacks=hang))
    (tmp_path / "hang.py").write_text(HANG_CALLBACK)
    # One thread in every run: the same arithmetic, and no spinning threads on a busy machine.
    path = os.pathsep.join(p for p in (str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    ref_dir, crash_dir = tmp_path / "ref", tmp_path / "crashed"
    ref_dir.mkdir()
    crash_dir.mkdir()

    # Both processes start now and import while the uninterrupted reference run trains in this one.
    last = crash_dir / "ckpts" / "last.ckpt"
    proc = spectralds(["fit", "--config", str(crash)], crash_dir, env, tmp_path / "crash.log")
    resumed = spectralds(
        ["fit", "--config", str(base), f"--ckpt_path={last}"], crash_dir, env, tmp_path / "resume.log", True
    )
    try:
        monkeypatch.chdir(ref_dir)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert run_cli(["fit", "--config", str(base)]) == 0
        finally:
            torch.set_num_threads(threads)
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None, (tmp_path / "crash.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run to crash never reached its hang point"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL

        saved = torch.load(last, weights_only=True)
        epoch_batches = saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"]
        assert (saved["global_step"], saved["epoch"]) == (RESUME_STEP, 1)
        assert 0 < epoch_batches < int(marker.read_text())  # killed mid-epoch, resumed mid-epoch

        resumed.communicate(b"go\n", timeout=300)
        assert resumed.returncode == 0, (tmp_path / "resume.log").read_text()[-3000:]
    finally:
        for p in (proc, resumed):
            p.kill()
            p.wait()

    ref = torch.load(ref_dir / "ckpts" / "last.ckpt", weights_only=True)
    res = torch.load(last, weights_only=True)
    assert ref["global_step"] == res["global_step"] == MAX_STEPS
    assert ref["state_dict"].keys() == res["state_dict"].keys()
    for key, value in ref["state_dict"].items():
        assert torch.equal(value, res["state_dict"][key]), key
    ref_adam, res_adam = (c["optimizer_states"][0]["state"].values() for c in (ref, res))
    for ref_state, res_state in zip(ref_adam, res_adam, strict=True):
        assert all(torch.equal(ref_state[k], res_state[k]) for k in ref_state)
    assert last_val_loss(ref_dir) == last_val_loss(crash_dir)


# ---- atomic and finite saves ------------------------------------------------------------------------


def tiny_lm(**overrides) -> LanguageModel:
    kwargs = dict(
        vocab_size=256, dim=16, num_layers=2, layer_pattern=["stu", "attn"], seq_len=32, num_filters=4
    )
    kwargs["layer_kwargs"] = {"attn": {"num_heads": 2, "window_size": 8}}
    return LanguageModel(**{**kwargs, **overrides})


def lm_checkpoint(model: LanguageModel) -> dict:
    """What Lightning would save for `model` (the parts spectralds.checkpoint_io.load_model reads)."""
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)
    return checkpoint


@pytest.fixture
def good_checkpoint(tmp_path) -> tuple[Path, bytes]:
    torch.manual_seed(0)
    path = tmp_path / "ckpts" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(lm_checkpoint(tiny_lm()), path)
    return path, path.read_bytes()


def assert_untouched(path: Path, original: bytes) -> None:
    assert path.read_bytes() == original
    assert AtomicCheckpointIO().load_checkpoint(path)["state_dict"].keys() == tiny_lm().state_dict().keys()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no stray temporary file


@pytest.mark.parametrize("failing", ["torch.save", "os.replace"])
def test_a_failed_save_leaves_the_previous_checkpoint_whole(good_checkpoint, monkeypatch, failing):
    path, original = good_checkpoint
    real_save = torch.save

    def save_half(obj, f, *args, **kwargs):  # the disk fills up halfway through the new checkpoint
        real_save(obj, f, *args, **kwargs)
        f.truncate(len(original) // 2)
        raise OSError(28, "No space left on device")

    def refuse_replace(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(
        *(("torch.save", save_half) if failing == "torch.save" else ("os.replace", refuse_replace))
    )
    torch.manual_seed(1)
    with pytest.raises(OSError):
        AtomicCheckpointIO().save_checkpoint(lm_checkpoint(tiny_lm()), path)
    monkeypatch.undo()
    assert_untouched(path, original)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_process_killed_mid_save_leaves_the_previous_checkpoint_whole(good_checkpoint):
    path, original = good_checkpoint
    torch.manual_seed(1)
    newer = lm_checkpoint(tiny_lm())
    pid = os.fork()
    if pid == 0:  # the child dies (kill -9) after writing part of the new checkpoint
        try:

            def save_and_die(obj, f, *args, **kwargs):
                f.write(b"PK\x03\x04" + bytes(1000))
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)

            torch.save = save_and_die
            AtomicCheckpointIO().save_checkpoint(newer, path)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    leftovers = [p.name for p in path.parent.iterdir() if p != path]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.ckpt.") and leftovers[0].endswith(".tmp")
    (path.parent / leftovers[0]).unlink()
    assert_untouched(path, original)
    AtomicCheckpointIO().save_checkpoint(newer, path)  # the next save goes through
    assert path.read_bytes() != original


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nonfinite_checkpoint_is_refused(good_checkpoint, bad):
    path, original = good_checkpoint
    model = tiny_lm()
    with torch.no_grad():
        model.blocks[1].mlp.w2.weight[3, 1] = bad
    with pytest.raises(FloatingPointError) as error:
        AtomicCheckpointIO().save_checkpoint(lm_checkpoint(model), path)
    message = str(error.value)
    assert str(path) in message and "'blocks.1.mlp.w2.weight'" in message and "\n" not in message
    assert_untouched(path, original)


# ---- loading bad files --------------------------------------------------------------------------------


def test_a_checkpoint_of_another_architecture_is_a_one_line_error(good_checkpoint, capsys):
    path, _ = good_checkpoint
    # The weights of the 2-layer model under the hyperparameters of a 3-layer one (an edited config).
    mismatched = path.with_name("mismatched.ckpt")
    checkpoint = lm_checkpoint(tiny_lm())
    checkpoint["hyper_parameters"].update(num_layers=3)
    AtomicCheckpointIO().save_checkpoint(checkpoint, mismatched)
    original = mismatched.read_bytes()
    with pytest.raises(ValueError, match=f"^checkpoint {mismatched} does not match a LanguageModel") as error:
        load_model(mismatched)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=f"^checkpoint {path} does not match a SequenceRegression"):
        load_model(path, model_class="SequenceRegression")
    err = one_line_error(capsys, ["generate", "--ckpt", str(mismatched), "--prompt", "x"])
    assert err.startswith(f"spectralds: error: checkpoint {mismatched} does not match a LanguageModel")
    assert mismatched.read_bytes() == original
    # Resuming a fit from weights that do not fit the architecture the checkpoint names.
    checkpoint["hyper_parameters"].update(num_layers=2, _class_path="spectralds.models.LanguageModel")
    checkpoint["pytorch-lightning_version"] = lightning.__version__
    checkpoint["state_dict"].pop("blocks.1.mlp.w2.weight")
    AtomicCheckpointIO().save_checkpoint(checkpoint, mismatched)
    args = ["fit", "--config", TINY, f"--data.source={CORPUS}", "--trainer.logger=false"]
    err = one_line_error(capsys, [*args, f"--ckpt_path={mismatched}"])
    assert err.startswith("spectralds: error: the checkpoint does not match the model") and "w2" in err


def test_a_truncated_checkpoint_is_a_one_line_error(good_checkpoint, capsys):
    path, original = good_checkpoint
    truncated = path.with_name("truncated.ckpt")
    truncated.write_bytes(original[: len(original) // 2])
    expected = f"checkpoint {truncated} could not be read"
    for read in (load_model, AtomicCheckpointIO().load_checkpoint):
        with pytest.raises(ValueError, match=f"^{expected}") as error:
            read(truncated)
        assert "\n" not in str(error.value)
    # Resuming a fit from it (LightningCLI reads its hyperparameters first).
    args = ["fit", "--config", TINY, f"--data.source={CORPUS}", "--trainer.logger=false"]
    assert one_line_error(capsys, [*args, f"--ckpt_path={truncated}"]).startswith(
        f"spectralds: error: {expected}"
    )
    assert truncated.read_bytes() == original[: len(original) // 2] and path.read_bytes() == original
    missing = path.with_name("missing.ckpt")
    assert one_line_error(capsys, [*args, f"--ckpt_path={missing}"]) == (
        f"spectralds: error: checkpoint {missing} does not exist"  # from AtomicCheckpointIO, the Trainer's
    )


# ---- the CLI's defaults -------------------------------------------------------------------------------


def cli_trainer(*args: str):
    from spectralds.cli_lightning import SpectraLDSCLI

    base = ["--config", TINY, f"--data.source={CORPUS}", "--trainer.logger=false"]
    return SpectraLDSCLI(args=[*base, *args], run=False).trainer


def test_the_cli_saves_atomically_and_keeps_a_last_checkpoint_by_default():
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    trainer = cli_trainer()
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    assert [c.save_last for c in trainer.callbacks if isinstance(c, ModelCheckpoint)] == [True]
    # The user's own choices stay.
    trainer = cli_trainer(
        "--trainer.plugins=lightning.pytorch.plugins.io.TorchCheckpointIO",
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps=7",
    )
    assert type(trainer.strategy.checkpoint_io) is TorchCheckpointIO
    checkpoints = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert len(checkpoints) == 1 and checkpoints[0].save_last is None
    assert checkpoints[0]._every_n_train_steps == 7


SIGTERM_CALLBACK = """
import os
import signal

from lightning.pytorch.callbacks import Callback


class TermAt(Callback):
    '''Sends this process SIGTERM after `step` optimizer steps, as a scheduler's preemption would.'''

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
"""


def test_sigterm_saves_where_it_stopped_and_exits_non_zero(tmp_path, monkeypatch, capsys):
    """A run stopped by SIGTERM saves last.ckpt at the step it reached, says so in one line and exits 143
    (Lightning itself would exit 0), and the saved step resumes."""
    (tmp_path / "term.py").write_text(SIGTERM_CALLBACK)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "run.yaml"
    term = "    - class_path: term.TermAt\n      init_args: {step: 5}"
    config.write_text(RUN_CONFIG.format(corpus=CORPUS, extra_callbacks=term))
    assert run_cli(["fit", "--config", str(config)]) == 143
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("spectralds: error: stopped by SIGTERM: saved ") and "global step 5" in err
    last = tmp_path / "ckpts" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 5  # not 3, the last interval's checkpoint
    plain = tmp_path / "plain.yaml"
    plain.write_text(RUN_CONFIG.format(corpus=CORPUS, extra_callbacks=""))
    assert run_cli(["fit", "--config", str(plain), f"--ckpt_path={last}"]) == 0
    assert torch.load(last, weights_only=True)["global_step"] == MAX_STEPS
