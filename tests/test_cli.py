"""The `spectralds` command: every YAML parses, a tiny fit logs to TensorBoard, bad input is one line."""

import glob
import math
from pathlib import Path

import pytest
from cli_helpers import one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(glob.glob(str(ROOT / "configs" / "*.yaml")))
SNIPPETS = sorted(glob.glob(str(ROOT / "callbacks" / "*.yaml")))
TINY = str(ROOT / "tests" / "assets" / "configs" / "tiny_lm.yaml")
CORPUS = str(ROOT / "tests" / "assets" / "data" / "corpus")


pytestmark = pytest.mark.usefixtures("cli_env")



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


def test_unknown_layer_name(capsys):
    err = one_line_error(capsys, ["fit", "--config", TINY, "--model.init_args.layer_pattern=[stu, mamba]"])
    assert err == "spectralds: error: unknown layer 'mamba'; registered layers: attn, lds, lds_ar, stu, stu_t"


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


def test_distill_filters_writes_a_validated_file(tmp_path, capsys):
    from spectralds.distill import load_fit

    out = tmp_path / "lds.safetensors"
    args = ["distill-filters", "--seq-len", "256", "--num-filters", "8", "--state-dim", "24"]
    assert run_cli([*args, "--out", str(out), "--no-progress"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    fit = load_fit(out, expect_seq_len=256, expect_num_filters=8, expect_variant="hankel")
    assert fit.A.shape == (24,) and fit.C.shape == (24, 16) and fit.A.abs().max() <= 1
    assert fit.rel_mse_f64 < 1e-10 and len(fit.rel_mse_f64_per_filter) == 16
    err = one_line_error(capsys, [*args, "--out", "/proc/nope/lds.safetensors"])
    assert err.startswith("spectralds: error:")


def test_generate_from_checkpoint_and_bad_checkpoints(tmp_path, capsys):
    args = ["fit", "--config", TINY, f"--data.source={CORPUS}", "--trainer.logger.init_args.name=gen"]
    assert run_cli(args) == 0
    ckpt = next((tmp_path / "runs" / "gen" / "version_0" / "checkpoints").glob("*.ckpt"))
    capsys.readouterr()
    assert run_cli(["generate", "--ckpt", str(ckpt), "--prompt", "def f(", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("def f(")
    err = one_line_error(capsys, ["generate", "--ckpt", str(ckpt), "--prompt", "x" * 40])
    assert "exceeds the model's context of 32 tokens" in err
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(ckpt.read_bytes()[:1000])
    err = one_line_error(capsys, ["generate", "--ckpt", str(corrupt), "--prompt", "x"])
    assert err.startswith(f"spectralds: error: checkpoint {corrupt} could not be read")
    assert corrupt.stat().st_size == 1000  # nothing overwritten
    err = one_line_error(capsys, ["generate", "--ckpt", str(tmp_path / "missing.ckpt"), "--prompt", "x"])
    assert "does not exist" in err
