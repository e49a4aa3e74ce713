"""Issue 26 §2 through `spectralds fit`: the final weights are saved at the true last step (before the
distillation changes the layers), a SIGTERM during the distillation exits non-zero naming what was saved,
and the distillation / pruning / report arguments that can only fail late are refused before the first
step: exit status 2, one `spectralds: error:` line, no traceback, no file changed, no training step."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from cli_helpers import fails, run_cli

import spectralds.callbacks.distillation as distillation
from spectralds import compat
from spectralds.models import LanguageModel

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "tests" / "assets" / "configs" / "tiny_lm.yaml")
CORPUS = str(ROOT / "tests" / "assets" / "data" / "corpus")
TASKS = str(ROOT / "spectralds" / "evaluation" / "tasks")

pytestmark = pytest.mark.usefixtures("cli_env")


def snippet(tmp_path: Path, name: str, class_path: str, **init_args) -> str:
    """A --trainer.callbacks+= file (JSON is YAML)."""
    if "." not in class_path:
        class_path = f"spectralds.callbacks.{class_path}"
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps({"class_path": class_path, "init_args": init_args}))
    return str(path)


def distill(tmp_path: Path, name: str = "distill", **init_args) -> str:
    # seq_len 32 fits only to ~4e-5 with the default 8 states: loosened so that the tiny model distills.
    return snippet(tmp_path, name, "STUToLDSDistillation", max_fit_error=1e-3, log_plot=False, **init_args)


def fit_args(*callbacks: str, steps: int = 4) -> list[str]:
    args = ["fit", "--config", TINY, f"--data.source={CORPUS}", f"--trainer.max_steps={steps}"]
    return args + [f"--trainer.callbacks+={c}" for c in callbacks]


def refused(capsys, tmp_path: Path, steps_taken: list[int], args: list[str], *expected: str) -> str:
    """Exit 2, one line holding every `expected` piece, no existing file changed, no step, no checkpoint."""
    err = fails(capsys, tmp_path, args, *expected, also=(TINY,))
    assert steps_taken == [] and not list(tmp_path.rglob("*.ckpt"))
    return err


def checkpoints(tmp_path: Path) -> Path:
    (found,) = {p.parent for p in tmp_path.rglob("last.ckpt")}
    return found


def mixer_kind(state_dict: dict) -> str:
    """The first block's mixer: an LDS has a state matrix A (both keep the STU's M)."""
    return "lds" if "blocks.0.mixer.A" in state_dict else "stu"


# ---- the final weights ----------------------------------------------------------------------------
@pytest.mark.parametrize("with_distillation, save_last", [(False, True), (True, True), (True, "link")])
def test_last_ckpt_holds_the_trained_model_at_the_true_last_step(tmp_path, capsys, with_distillation,
                                                                  save_last):
    """max_steps 5, checkpoints every 2 steps: last.ckpt is step 5 (it was step 4), and with a distillation
    it is the STU model lds.ckpt was distilled from, at the same step. save_last "link" linked last.ckpt to
    the step-4 checkpoint: it becomes a file of step 5, and the step-4 file is not written through."""
    every2 = snippet(tmp_path, "every2", "lightning.pytorch.callbacks.ModelCheckpoint",
                     save_last=save_last, every_n_train_steps=2)
    extra = [distill(tmp_path)] if with_distillation else []
    assert run_cli(fit_args(every2, *extra, steps=5)) == 0, capsys.readouterr().err[-2000:]
    folder = checkpoints(tmp_path)
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert last["global_step"] == 5
    assert mixer_kind(last["state_dict"]) == "stu"
    assert not (folder / "last.ckpt").is_symlink()
    step4 = torch.load(folder / "epoch=0-step=4.ckpt", weights_only=True)  # the interval checkpoint stays
    assert step4["global_step"] == 4
    if with_distillation:
        lds = torch.load(folder / "lds.ckpt", weights_only=True)
        assert lds["global_step"] == 5 and mixer_kind(lds["state_dict"]) == "lds"
        shared = last["state_dict"].keys() & lds["state_dict"].keys()
        assert "blocks.0.mixer.M_phi_plus" in shared and len(shared) > 10
        for key in shared:  # the distillation keeps M and every other weight: the same trained model
            assert torch.equal(last["state_dict"][key], lds["state_dict"][key]), key


def test_compat_checkpoint_attributes_exist():
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoint = ModelCheckpoint(save_last=True)
    missing = [name for name in compat.CHECKPOINT_ATTRIBUTES if not hasattr(checkpoint, name)]
    assert not missing, f"ModelCheckpoint lost {missing}: adapt spectralds/compat.py"
    assert compat.checkpoint_step_saved(checkpoint) == 0


# ---- SIGTERM during the distillation -------------------------------------------------------------
@pytest.fixture
def sigterm_in_the_swap(monkeypatch):
    """SIGTERM arrives while the layers are converted (Lightning only notes it and goes on)."""
    real = distillation.distill_stu_layers
    armed = {"on": True}  # the test disarms it for a later run

    def terminated_meanwhile(*args, **kwargs):
        if armed["on"]:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(distillation, "distill_stu_layers", terminated_meanwhile)
    return armed


@pytest.mark.parametrize("val_batches, prune", [(2, False), (1, False), (1, True)])
def test_sigterm_during_the_distillation_exits_143_naming_what_was_saved(
    tmp_path, capsys, sigterm_in_the_swap, val_batches, prune
):
    """With 2 validation batches the validation after the swap stops at its first (Lightning), before
    lds.ckpt; with 1 the distillation finishes and saves lds.ckpt, and a pruning after it does not start.
    Either way: exit 143 (never 0), one line naming every file saved and those not made, and last.ckpt the
    trained STU model of the last step, not the half-finished swap."""
    pruning = [snippet(tmp_path, "prune", "LayerAdaptiveStatePruning")] if prune else []
    args = fit_args(distill(tmp_path), *pruning, steps=4) + [f"--trainer.limit_val_batches={val_batches}"]
    assert run_cli(args) == 143
    err = capsys.readouterr().err.strip()
    line = err.splitlines()[-1]
    assert "Traceback" not in err and line.startswith("spectralds: error: stopped by SIGTERM: saved ")
    folder = checkpoints(tmp_path).relative_to(tmp_path)  # the run's paths are relative to its directory
    assert f"{folder / 'last.ckpt'} (global step 4, the trained model)" in line
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4 and mixer_kind(last["state_dict"]) == "stu"
    assert not (folder / "lds_pruned.ckpt").exists()
    if val_batches == 2:
        assert not (folder / "lds.ckpt").exists()
        assert "not made: lds.ckpt" in line and f"spectralds distill --ckpt {folder / 'last.ckpt'}" in line
    else:
        assert str(folder / "lds.ckpt") in line
        assert ("not made: lds_pruned.ckpt" in line) == prune and ("not made" in line) == prune
        assert mixer_kind(torch.load(folder / "lds.ckpt", weights_only=True)["state_dict"]) == "lds"


def test_sigterm_during_a_mid_run_swap_saves_a_resumable_lds_state(tmp_path, capsys, sigterm_in_the_swap):
    """Swapping at step 2, stopped in the validation after the swap: last.ckpt holds the LDS model of step
    2 and its optimizer, and resuming it trains on to the end."""
    args = fit_args(distill(tmp_path, at_step=2), steps=4) + ["--trainer.limit_val_batches=2"]
    assert run_cli(args) == 143
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "stopped by SIGTERM: saved " in line and "(global step 2); resume with --ckpt_path" in line
    last = checkpoints(tmp_path) / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 2 and mixer_kind(saved["state_dict"]) == "lds"
    sigterm_in_the_swap["on"] = False  # the resumed run is not signalled (and needs no swap)
    assert run_cli(args + [f"--ckpt_path={last}"]) == 0, capsys.readouterr().err[-2000:]
    steps = {p.parent.parent.name: torch.load(p, weights_only=True)["global_step"] for p in
             tmp_path.rglob("last.ckpt")}
    assert steps == {"version_0": 2, "version_1": 4}  # the resumed run logs to a new version


# ---- refused before the first step ------------------------------------------------------------------
def test_distillation_at_step_beyond_the_run_is_refused(tmp_path, capsys, steps_taken):
    refused(capsys, tmp_path, steps_taken, fit_args(distill(tmp_path, at_step=10)),
            "STUToLDSDistillation: at_step 10 is beyond the run's end", "after 4 steps")


def test_distillation_at_epoch_beyond_the_run_is_refused(tmp_path, capsys, steps_taken):
    refused(capsys, tmp_path, steps_taken, fit_args(distill(tmp_path, at_epoch=3)),
            "STUToLDSDistillation: at_epoch 3 is beyond the run's end", "its last epoch is 0")


def test_pruning_at_step_beyond_the_run_is_refused(tmp_path, capsys, steps_taken):
    prune = snippet(tmp_path, "prune", "LayerAdaptiveStatePruning", at_step=7)
    refused(capsys, tmp_path, steps_taken, fit_args(distill(tmp_path, at_step=1), prune),
            "LayerAdaptiveStatePruning: at_step 7 is beyond the run's end")


def test_pruning_without_distillation_is_refused(tmp_path, capsys, steps_taken):
    prune = snippet(tmp_path, "prune", "LayerAdaptiveStatePruning")
    refused(capsys, tmp_path, steps_taken, fit_args(prune),
            "LayerAdaptiveStatePruning: the model has no LDS layer and no STUToLDSDistillation")


@pytest.mark.parametrize("prune_args, distill_args, order", [
    ({}, {}, "prune first"),  # both at the end of training, pruning listed first
    ({"at_step": 1}, {}, "distill first"),  # pruning mid-run, distillation only at the end
    ({"at_step": 1}, {"at_step": 2}, "distill first"),
])
def test_pruning_before_the_distillation_is_refused(tmp_path, capsys, steps_taken, prune_args, distill_args,
                                                    order):
    prune = snippet(tmp_path, "prune", "LayerAdaptiveStatePruning", **prune_args)
    swap = distill(tmp_path, **distill_args)
    callbacks = [prune, swap] if order == "prune first" else [swap, prune]
    refused(capsys, tmp_path, steps_taken, fit_args(*callbacks),
            "LayerAdaptiveStatePruning", "would run before STUToLDSDistillation")


def test_distillation_save_path_that_is_a_directory_is_refused(tmp_path, capsys, steps_taken):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "keep.txt").write_text("the user's")
    refused(capsys, tmp_path, steps_taken, fit_args(distill(tmp_path, save_path=str(folder))),
            f"save_path {folder} is a directory", "distilled LDS model would not be saved")


@pytest.mark.slow  # indexes lm-eval's thousands of task YAMLs (seconds idle, ~25 s on 2 busy cores)
def test_stage_report_of_an_unknown_task_is_refused(tmp_path, capsys, steps_taken):
    report = snippet(tmp_path, "report", "StageReport", label="final", eval_tasks=["no_such_task_26"],
                     eval_include_path=TASKS)
    refused(capsys, tmp_path, steps_taken, fit_args(report),
            "StageReport 'final' eval_tasks", "unknown task(s) no_such_task_26")


def test_at_step_over_unsized_data_is_not_refused(tmp_path):
    """An iterable dataset has no length, so the run's end is unknown (Lightning estimates max_steps -1):
    at_step is taken as given, and the swap happens when it is reached."""
    import lightning as L
    from torch.utils.data import DataLoader, IterableDataset

    from spectralds.callbacks import STUToLDSDistillation

    class Stream(IterableDataset):
        def __iter__(self):
            gen = torch.Generator().manual_seed(0)
            for _ in range(24):
                tokens = torch.randint(0, 16, (65,), generator=gen)
                yield tokens[:-1], tokens[1:]

    torch.manual_seed(0)
    model = LanguageModel(vocab_size=16, dim=8, num_layers=1, layer_pattern=["stu"], seq_len=64,
                          num_filters=4)
    swap = STUToLDSDistillation(state_dim=16, at_step=3, validate=False, save_path=None, log_plot=False)
    trainer = L.Trainer(callbacks=[swap], max_epochs=1, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(model, DataLoader(Stream(), batch_size=4))
    assert swap.done and trainer.global_step == 6 and mixer_kind(model.state_dict()) == "lds"
