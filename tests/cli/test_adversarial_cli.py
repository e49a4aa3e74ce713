"""Bad input through the `spectralds` command: exit status 2, one `spectralds: error:` line naming the
problem, no traceback, and every file that existed before byte-for-byte unchanged."""

import os
from pathlib import Path

import cli_helpers
import pytest
import torch

from spectralds.models import LanguageModel

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "tests" / "assets" / "configs" / "tiny_lm.yaml")
CORPUS = str(ROOT / "tests" / "assets" / "data" / "corpus")
DISTILL = str(ROOT / "callbacks" / "distill.yaml")
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
HPARAMS = dict(vocab_size=256, dim=16, num_layers=1, layer_pattern=["stu"], seq_len=32, num_filters=4)

pytestmark = pytest.mark.usefixtures("cli_env")


def fails(capsys, tmp_path: Path, args: list[str], *expected: str) -> str:
    """`cli_helpers.fails`, the repository's configs unchanged too."""
    return cli_helpers.fails(capsys, tmp_path, args, *expected, also=(TINY, QUICKSTART, DISTILL))


def lightning_checkpoint(path: Path, **changes) -> Path:
    """A checkpoint as `spectralds fit` writes it (the parts generate reads), with `changes` applied."""
    torch.manual_seed(0)
    model = LanguageModel(**HPARAMS)
    checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": {"_class_path": "spectralds.models.LanguageModel", **HPARAMS},
        "pytorch-lightning_version": "2.6.0",
    }
    checkpoint.update(changes)
    torch.save(checkpoint, path)
    return path


def generate(ckpt, *extra: str) -> list[str]:
    return ["generate", "--ckpt", str(ckpt), "--prompt", "def f(", "--max-new-tokens", "4", *extra]


# ---- the config parser ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--model.init_args.dim=abc", ["model.init_args.dim", "expected int", "'abc'"]),
        ("--model.class_path=no.such.Model", ["model.class_path", "no.such.Model"]),
        ("--model.init_args.dimm=8", ["dimm", "not accepted"]),
        ("--bogus=1", ["unrecognized arguments: --bogus=1"]),
        ("--trainer.max_steps=abc", ["trainer.max_steps", "expected int"]),
    ],
)
def test_parser_errors_are_one_line(override, expected, capsys, tmp_path):
    err = fails(capsys, tmp_path, ["fit", "--config", TINY, override], *expected)
    assert err.endswith("(see `spectralds fit --help`)")


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "does not exist"),
        ("", "is empty"),
        ("- trainer\n- model\n", "must hold a mapping"),
        ("trainer: [unclosed\n", "is not valid YAML"),
        ("trainerr:\n  max_steps: 3\n", "trainerr"),
    ],
    ids=["missing", "empty", "list", "bad-yaml", "unknown-key"],
)
def test_bad_config_files(content, expected, capsys, tmp_path):
    config = tmp_path / "config.yaml"
    if content is not None:
        config.write_text(content)
    fails(capsys, tmp_path, ["fit", "--config", str(config)], expected)


def test_config_is_a_directory(capsys, tmp_path):
    fails(capsys, tmp_path, ["validate", "--config", str(tmp_path)], str(tmp_path), "is a directory")


def test_negative_max_steps(capsys, tmp_path):
    args = ["fit", "--config", TINY, f"--data.source={CORPUS}", "--trainer.max_steps=-5"]
    fails(capsys, tmp_path, args, "max_steps", "-5")


def test_unknown_command(capsys, tmp_path):
    fails(capsys, tmp_path, ["frobnicate", "--x"], "unknown command 'frobnicate'", "generate", "fit")


def test_two_distillation_callbacks_through_the_readme_drop_in(capsys, tmp_path):
    """quickstart.yaml already distills; adding callbacks/distill.yaml would run two distillations."""
    args = ["fit", "--config", QUICKSTART, f"--trainer.callbacks+={DISTILL}", "--trainer.max_steps=1"]
    fails(capsys, tmp_path, args, "STUToLDSDistillation twice")
    assert not (tmp_path / "runs").exists()  # refused before the run started


# ---- generate ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["--max-new-tokens", "abc"], "--max-new-tokens: invalid int value: 'abc'"),
        (["--temperature", "nan"], "--temperature must be a finite number"),
        (["--temperature", "-0.5"], "--temperature must be >= 0"),
        (["--top-k", "0"], "--top-k must be >= 1, got 0"),
        (["--prompt", ""], "the prompt is empty"),
        (["--decode", "fast"], "--decode: invalid choice: 'fast'"),
    ],
)
def test_generate_arguments(extra, expected, capsys, tmp_path):
    ckpt = lightning_checkpoint(tmp_path / "model.ckpt")
    fails(capsys, tmp_path, generate(ckpt, *extra), expected)


def test_generate_needs_a_prompt(capsys, tmp_path):
    args = ["generate", "--ckpt", str(lightning_checkpoint(tmp_path / "model.ckpt"))]
    fails(capsys, tmp_path, args, "required: --prompt", "spectralds generate --help")


# ---- checkpoints ---------------------------------------------------------------------------------


def test_checkpoint_missing(capsys, tmp_path):
    missing = tmp_path / "missing.ckpt"
    fails(capsys, tmp_path, generate(missing), f"checkpoint {missing} does not exist")


def test_checkpoint_is_a_directory(capsys, tmp_path):
    fails(capsys, tmp_path, generate(tmp_path), f"checkpoint {tmp_path} is a directory")
    args = ["fit", "--config", TINY, f"--data.source={CORPUS}", f"--ckpt_path={tmp_path}"]
    fails(capsys, tmp_path, args, f"checkpoint {tmp_path} is a directory")


def test_checkpoint_truncated(capsys, tmp_path):
    good = lightning_checkpoint(tmp_path / "good.ckpt").read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good[: len(good) // 3])
    fails(capsys, tmp_path, generate(truncated), f"checkpoint {truncated} could not be read")


def test_checkpoint_with_nan_weights(capsys, tmp_path):
    torch.manual_seed(0)
    state = LanguageModel(**HPARAMS).state_dict()
    state["norm.weight"][0] = float("nan")
    ckpt = lightning_checkpoint(tmp_path / "nan.ckpt", state_dict=state)
    fails(capsys, tmp_path, generate(ckpt), str(ckpt), "'norm.weight' holds NaN or Inf")


def test_not_a_lightning_checkpoint(capsys, tmp_path):
    ckpt = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(3)}, ckpt)
    fails(capsys, tmp_path, generate(ckpt), "is not a Lightning checkpoint")


def test_checkpoint_names_a_class_that_is_not_a_lightning_module(capsys, tmp_path):
    hparams = {"_class_path": "collections.OrderedDict"}
    ckpt = lightning_checkpoint(tmp_path / "x.ckpt", hyper_parameters=hparams)
    fails(capsys, tmp_path, generate(ckpt), "collections.OrderedDict is not a LightningModule")


def test_checkpoint_names_a_missing_class(capsys, tmp_path):
    ckpt = lightning_checkpoint(tmp_path / "x.ckpt", hyper_parameters={"_class_path": "nowhere.Model"})
    fails(capsys, tmp_path, generate(ckpt), "nowhere.Model cannot be imported")


def test_checkpoint_layers_of_the_wrong_type(capsys, tmp_path):
    ckpt = lightning_checkpoint(tmp_path / "x.ckpt", spectralds_layers="blocks.0.mixer")
    fails(capsys, tmp_path, generate(ckpt), "'spectralds_layers' must map layer paths", "got a str")


def test_checkpoint_with_code_is_refused(capsys, tmp_path):
    """A pickle that would run code on load: weights_only refuses it, and nothing runs."""
    marker = tmp_path / "ran"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Exploit(str(marker))}, ckpt)
    fails(capsys, tmp_path, generate(ckpt), f"checkpoint {ckpt} could not be read")
    assert not marker.exists()


class Exploit:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


# ---- distill-filters --out -----------------------------------------------------------------------


def fifo(tmp_path: Path) -> str:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return str(path)


def under_a_file(tmp_path) -> str:
    (tmp_path / "f").write_text("")
    return str(tmp_path / "f" / "such" / "lds.safetensors")


@pytest.mark.parametrize(
    "out, expected",
    [
        (lambda tmp: "", "the output path is empty"),
        (lambda tmp: "/dev/null", "not a regular file"),
        (lambda tmp: str(tmp), "is a directory"),
        (fifo, "not a regular file"),
        (under_a_file, "not a directory"),
        (lambda tmp: "/proc/no/such/lds.safetensors", "cannot create directory"),
    ],
    ids=["empty", "dev-null", "directory", "fifo", "under-a-file", "uncreatable-dir"],
)
def test_distill_filters_refuses_bad_outputs(out, expected, capsys, tmp_path):
    args = ["distill-filters", "--seq-len", "64", "--num-filters", "4", "--state-dim", "8", "--no-progress"]
    fails(capsys, tmp_path, [*args, "--out", out(tmp_path)], expected)


def test_output_folders_are_created(capsys, tmp_path):
    """An output path in folders that do not exist yet is written there (the folders made first)."""
    from cli_helpers import run_cli

    out = tmp_path / "new" / "dir" / "lds.safetensors"
    args = ["distill-filters", "--seq-len", "64", "--num-filters", "4", "--state-dim", "8", "--no-progress"]
    assert run_cli([*args, "--out", str(out)]) == 0
    assert out.is_file()
