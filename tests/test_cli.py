"""The `spectralds` command: every YAML parses, a tiny fit logs to TensorBoard, bad input is one line."""

import glob
import math
import sys
from pathlib import Path

import pytest

from spectralds.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(glob.glob(str(ROOT / "configs" / "*.yaml")))
SNIPPETS = sorted(glob.glob(str(ROOT / "callbacks" / "*.yaml")))
TINY = str(ROOT / "tests" / "assets" / "configs" / "tiny_lm.yaml")
CORPUS = str(ROOT / "tests" / "assets" / "data" / "corpus")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["spectralds"])  # LightningCLI warns when pytest's args are there
    monkeypatch.setenv("SPECTRALDS_CACHE_DIR", str(tmp_path / "cache"))


def run_cli(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def test_configs_exist():
    names = {Path(p).name for p in CONFIGS}
    assert {"quickstart.yaml", "flash_stu_340m.yaml", "synthetic_stu.yaml"} <= names
    assert {"distill.yaml", "prune.yaml"} <= {Path(p).name for p in SNIPPETS}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: Path(p).name)
def test_every_config_prints(config, capsys):
    assert run_cli(["fit", "--config", config, "--print_config"]) == 0
    out = capsys.readouterr().out
    assert "class_path: spectralds.models." in out


@pytest.mark.parametrize("snippet", SNIPPETS, ids=lambda p: Path(p).name)
def test_every_callback_snippet_plugs_in(snippet, capsys):
    args = ["fit", "--config", TINY, f"--trainer.callbacks+={snippet}", "--print_config"]
    assert run_cli(args) == 0
    assert "spectralds.callbacks." in capsys.readouterr().out


def test_tiny_fit_logs_tensorboard_and_saves_config(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["fit", "--config", TINY, f"--data.source={CORPUS}", "--trainer.logger.init_args.name=tiny"]
    assert run_cli(args) == 0
    run_dir = tmp_path / "runs" / "tiny" / "version_0"
    assert (run_dir / "config.yaml").is_file()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/ppl", "train/lr", "train/tokens_per_sec"} <= tags
    for tag in ("train/loss", "val/loss", "val/ppl", "train/tokens_per_sec"):
        assert all(math.isfinite(e.value) for e in events.Scalars(tag))
    hparams = (run_dir / "hparams.yaml").read_text()
    assert "model/init_args/dim: 16" in hparams


def one_line_error(capsys, args: list[str]) -> str:
    assert run_cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err


def test_unknown_layer_name(capsys):
    err = one_line_error(capsys, ["fit", "--config", TINY, "--model.init_args.layer_pattern=[stu, mamba]"])
    assert err == "spectralds: error: unknown layer 'mamba'; registered layers: attn, lds, stu, stu_t"


def test_missing_data_path(capsys):
    err = one_line_error(capsys, ["fit", "--config", TINY, "--data.source=/no/such/corpus"])
    assert err.startswith("spectralds: error:") and "/no/such/corpus" in err and "\n" not in err


def test_data_longer_than_model_context(capsys):
    err = one_line_error(capsys, ["fit", "--config", TINY, f"--data.source={CORPUS}", "--data.seq_len=64"])
    assert err == "spectralds: error: data seq_len 64 exceeds the model's seq_len 32"


def test_config_key_typo(capsys):
    assert run_cli(["fit", "--config", TINY, "--model.init_args.dimm=8"]) == 2
    assert "dimm" in capsys.readouterr().err


def test_unwritable_output_dir(capsys):
    args = [
        "fit",
        "--config",
        TINY,
        f"--data.source={CORPUS}",
        "--trainer.logger.init_args.save_dir=/proc/runs",
    ]
    err = one_line_error(capsys, args)
    assert err.startswith("spectralds: error:") and "/proc/runs" in err
