"""`spectralds distill`: a checkpoint -> its distilled (and pruned) LDS checkpoint, the same model the
callbacks make at the end of training, the swap table printed; bad input is one line, nothing written."""

from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import one_line_error, run_cli

from spectralds.checkpoint_io import load_model
from spectralds.layers.lds import LDS

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "assets" / "configs" / "tiny_lm.yaml"
CORPUS = str(ROOT / "tests" / "assets" / "data" / "corpus")
SEQ_LEN = 64  # the default fit (16 states) reaches max_fit_error at L=64, K=4

pytestmark = pytest.mark.usefixtures("cli_env")


@pytest.fixture
def trained(tmp_path, capsys) -> Path:
    """A tiny `spectralds fit` run whose callbacks distill and prune at the end: its checkpoints dir, holding
    last.ckpt (the trained STU model), lds.ckpt and lds_pruned.ckpt (what the callbacks made of it)."""
    config = yaml.safe_load(TINY.read_text())
    config["model"]["init_args"]["seq_len"] = config["data"]["init_args"]["seq_len"] = SEQ_LEN
    config["data"]["init_args"]["source"] = CORPUS
    config["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                   "init_args": {"save_dir": "runs", "name": "distill"}}
    config["trainer"]["callbacks"] = [
        {"class_path": "spectralds.callbacks.STUToLDSDistillation", "init_args": {"validate": False}},
        {"class_path": "spectralds.callbacks.LayerAdaptiveStatePruning", "init_args": {"validate": False}},
    ]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert run_cli(["fit", "--config", str(path)]) == 0
    capsys.readouterr()
    return tmp_path / "runs" / "distill" / "version_0" / "checkpoints"


def assert_same_weights(a: Path, b: Path) -> None:
    ours, theirs = load_model(a).state_dict(), load_model(b).state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def generated(capsys, ckpt: Path) -> str:
    assert run_cli(["generate", "--ckpt", str(ckpt), "--prompt", "def f(", "--max-new-tokens", "8"]) == 0
    return capsys.readouterr().out


def test_distill_makes_the_callbacks_model_prints_the_table_and_generates(trained, tmp_path, capsys):
    import lightning as L

    from spectralds.callbacks import STUToLDSDistillation
    from spectralds.distill.swap import distillation_table

    out = tmp_path / "lds.ckpt"
    assert run_cli(["distill", "--ckpt", str(trained / "last.ckpt"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert_same_weights(out, trained / "lds.ckpt")
    model = load_model(out)
    assert isinstance(model.blocks[0].mixer, LDS) and model.blocks[0].mixer.state_dim == 16

    # The table is the callback's, measured the same way: the callback applied to the same checkpoint.
    source = load_model(trained / "last.ckpt")
    callback = STUToLDSDistillation(validate=False, log_plot=False, save_path=None)
    trainer = L.Trainer(logger=False, accelerator="cpu", devices=1, enable_checkpointing=False)
    callback.apply(trainer, source, continue_training=False)
    table = distillation_table(callback.reports)
    assert table.splitlines()[2].startswith("blocks.0.mixer") and len(table.splitlines()) == 3
    assert printed == f"{table}\nsaved the distilled LDS model to {out}\n"
    assert callback.reports[0].rel_mse < 1e-6

    text = generated(capsys, out)
    assert text.startswith("def f(") and text == generated(capsys, trained / "lds.ckpt")


def test_distill_prune_is_the_pruning_callbacks_model(trained, tmp_path, capsys):
    out = tmp_path / "pruned.ckpt"
    args = ["distill", "--ckpt", str(trained / "last.ckpt"), "--out", str(out), "--prune", "0.5"]
    assert run_cli(args) == 0
    printed = capsys.readouterr().out
    assert "LAST pruning (last-refit, ratio 0.5): kept 8/16 states" in printed
    assert printed.endswith(f"saved the pruned LDS model to {out}\n")
    assert_same_weights(out, trained / "lds_pruned.ckpt")
    assert load_model(out).blocks[0].mixer.state_dim == 8
    assert generated(capsys, out).startswith("def f(")
    # an explicit --state-dim is the callback's state_dim
    args = ["distill", "--ckpt", str(trained / "last.ckpt"), "--out", str(out), "--state-dim", "12"]
    assert run_cli(args) == 0
    assert load_model(out).blocks[0].mixer.state_dim == 12


def test_bad_inputs_are_one_line_and_write_nothing(trained, tmp_path, capsys):
    ckpt = trained / "last.ckpt"
    original = ckpt.read_bytes()
    out = tmp_path / "out.ckpt"
    base = ["distill", "--ckpt", str(ckpt), "--out", str(out)]
    cases = [
        (["distill", "--ckpt", str(ckpt), "--out", str(ckpt)], "it is the input checkpoint --ckpt"),
        (["distill", "--ckpt", str(ckpt), "--out", str(trained / ".." / "checkpoints" / "last.ckpt")],
         "it is the input checkpoint --ckpt"),
        (["distill", "--ckpt", str(ckpt), "--out", str(tmp_path)], "it exists and is a directory"),
        (["distill", "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(out)], "does not exist"),
        (["distill", "--out", str(out)], "required: --ckpt"),
        ([*base, "--state-dim", "1"], "--state-dim must be >= 2"),
        ([*base, "--state-dim", "x"], "--state-dim: invalid int value"),
        ([*base, "--state-dim", "40"], "state_dim must be <= 16"),  # L=64 takes at most 16 states
        ([*base, "--max-fit-error", "0"], "--max-fit-error must be > 0"),
        ([*base, "--max-fit-error", "nan"], "--max-fit-error must be a finite number"),
        ([*base, "--max-fit-error", "1e-30"], "refusing to swap, no layer changed"),
        ([*base, "--prune", "1"], "--prune must be in (0, 1)"),
        ([*base, "--prune", "0"], "--prune must be > 0"),
        (["distill", "--ckpt", str(trained / "lds.ckpt"), "--out", str(out)], "no STU layer found"),
    ]
    for args, expected in cases:
        assert expected in one_line_error(capsys, args), args
        assert not out.exists() and ckpt.read_bytes() == original, args
