"""The `spectralds` command: every YAML parses, a tiny fit logs to TensorBoard, bad input is one line."""

import glob
import math
from pathlib import Path

import pytest
import yaml
from cli_helpers import one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(glob.glob(str(ROOT / "configs" / "*.yaml")))
SNIPPETS = sorted(glob.glob(str(ROOT / "callbacks" / "*.yaml")))
# Override files: each applies on top of the complete config named like its folder.
VARIANTS = sorted(glob.glob(str(ROOT / "configs" / "*" / "*.yaml")))
TINY = str(ROOT / "tests" / "assets" / "configs" / "tiny_lm.yaml")
CORPUS = str(ROOT / "tests" / "assets" / "data" / "corpus")


pytestmark = pytest.mark.usefixtures("cli_env")



def test_configs_exist():
    names = {Path(p).name for p in CONFIGS}
    assert {"quickstart.yaml", "flash_stu_340m.yaml", "synthetic.yaml", "lengthgen.yaml"} <= names
    variants = {str(Path(p).relative_to(ROOT / "configs")) for p in VARIANTS}
    expected = {"quickstart/distill_prune.yaml", "flash_stu_340m/transformer.yaml", "synthetic/lds.yaml"}
    assert expected <= variants
    assert {"distill.yaml", "prune.yaml"} <= {Path(p).name for p in SNIPPETS}


def test_every_yaml_under_configs_is_a_config_or_a_variant_of_one():
    """configs/X.yaml is a complete config, configs/X/*.yaml a variant of it: each is printed by a test
    below, so no YAML there escapes validation."""
    found = sorted(str(p) for p in (ROOT / "configs").rglob("*.y*ml"))
    assert found == sorted([*CONFIGS, *VARIANTS])
    assert all(Path(str(Path(v).parent) + ".yaml").is_file() for v in VARIANTS)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: Path(p).name)
def test_every_config_prints(config, capsys):
    assert run_cli(["fit", "--config", config, "--print_config"]) == 0
    out = capsys.readouterr().out
    assert "class_path: spectralds.models." in out


def _printed(capsys, args: list[str], flag: str = "--print_config") -> dict:
    assert run_cli([*args, flag]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_shows_the_derived_seq_len_and_linked_vocab_size_and_reparses(tmp_path, capsys):
    quickstart = str(ROOT / "configs" / "quickstart.yaml")
    args = ["fit", "--config", quickstart, "--data.seq_len=128"]
    printed = _printed(capsys, args)
    model, data = printed["model"]["init_args"], printed["data"]["init_args"]
    assert (model["seq_len"], data["seq_len"], model["vocab_size"]) == (128, 128, 256)  # byte tokenizer
    saved = tmp_path / "printed.yaml"
    saved.write_text(yaml.safe_dump(printed))
    assert _printed(capsys, ["fit", "--config", str(saved)]) == printed
    # skip_default leaves out what equals a default (the trainer's, the model's vocab_size 256), not the rest
    short = _printed(capsys, args, "--print_config=skip_default")
    assert short["model"]["init_args"]["seq_len"] == 128 and "num_sanity_val_steps" not in short["trainer"]


def test_print_config_without_the_tokenizer_file_prints_what_was_written_and_says_why(tmp_path, capsys):
    assert run_cli(["fit", "--config", str(ROOT / "configs" / "flash_stu_340m.yaml"), "--print_config"]) == 0
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["data"]["init_args"]["seq_len"] == 8192
    note = err.strip()
    assert note.startswith("spectralds: note: ") and "\n" not in note
    assert f"tiktoken file not found: {tmp_path / 'o200k_base.tiktoken'}" in note


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda p: f"{Path(p).parent.name}/{Path(p).name}")
def test_every_config_variant_prints_on_its_base(variant, capsys):
    base = str(Path(variant).parent) + ".yaml"
    assert run_cli(["fit", "--config", base, "--config", variant, "--print_config"]) == 0
    printed = capsys.readouterr().out
    assert "class_path: spectralds.models." in printed
    assert run_cli(["fit", "--config", base, "--print_config"]) == 0
    assert capsys.readouterr().out != printed  # a variant changes its base


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


def test_340m_config_without_its_tokenizer_file_is_one_line_naming_the_path_looked_for(tmp_path, capsys):
    err = one_line_error(capsys, ["fit", "--config", str(ROOT / "configs" / "flash_stu_340m.yaml")])
    assert err.startswith(f"spectralds: error: tiktoken file not found: {tmp_path / 'o200k_base.tiktoken'} ")
    assert "fetch o200k_base.tiktoken once" in err and "--data.tokenizer PATH" in err


def test_unknown_layer_name(capsys):
    err = one_line_error(capsys, ["fit", "--config", TINY, "--model.init_args.layer_pattern=[stu, mamba]"])
    prefix = "spectralds: error: unknown layer 'mamba'; registered layers: "
    assert err.startswith(prefix)  # other tests may have registered layers of their own
    assert {"attn", "lds", "lds_ar", "stu", "stu_t"} <= set(err.removeprefix(prefix).split(", "))


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


def test_help_lists_every_command_and_every_option_default(capsys):
    import inspect

    from spectralds.cli import COMMANDS, LIGHTNING_COMMANDS, command_function

    assert run_cli(["--help"]) == 0
    out = capsys.readouterr().out
    for name in [*LIGHTNING_COMMANDS, *COMMANDS]:
        assert any(line.split()[:1] == [name] and len(line.split()) > 1 for line in out.splitlines()), name
    for command in COMMANDS:
        assert run_cli([command, "--help"]) == 0
        out = capsys.readouterr().out
        options = [line.split()[0] for line in out.splitlines() if line.startswith("  --")]
        keyword_only = [n for n, p in inspect.signature(command_function(command)).parameters.items()
                        if p.kind is p.KEYWORD_ONLY]
        assert options == ["--" + name.replace("_", "-") for name in keyword_only]  # each parameter, in order
        # every option (not -h) says its default, or that it is required (never "(default: None)")
        text = " ".join(out.split())
        assert text.count("(default:") + text.count("(required)") == len(options), command
        if command in ("generate", "eval"):
            assert "--decode {futurefill,naive}" in out  # the choices are listed


def test_generate_from_a_user_module_checkpoint(tmp_path, capsys):
    """Any LightningModule that holds an STU layer: fit, distill to LDS, generate from both checkpoints."""
    import yaml

    config = yaml.safe_load(Path(TINY).read_text())
    config["model"] = {"class_path": "cli_helpers.UserLM", "init_args": {"dim": 8, "seq_len": 64}}
    distill = {"state_dim": 16, "validate": False}  # L=64 allows 16 states; 8 fit K=4 only to 8e-5
    config["trainer"]["callbacks"] = [
        {"class_path": "spectralds.callbacks.STUToLDSDistillation", "init_args": distill}
    ]
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["fit", "--config", str(path), f"--data.source={CORPUS}", "--trainer.logger.init_args.name=user"]
    assert run_cli(args) == 0
    checkpoints = tmp_path / "runs" / "user" / "version_0" / "checkpoints"
    capsys.readouterr()
    outputs = []
    for name in ("last.ckpt", "lds.ckpt"):
        gen = ["generate", "--ckpt", str(checkpoints / name), "--prompt", "def f(", "--max-new-tokens", "6"]
        assert run_cli(gen) == 0
        outputs.append(capsys.readouterr().out)
    assert all(out.startswith("def f(") for out in outputs)
    from spectralds.checkpoint_io import load_model
    from spectralds.layers.lds import LDS

    model = load_model(checkpoints / "lds.ckpt")
    assert type(model).__name__ == "UserLM" and isinstance(model.mixer, LDS)


def test_the_model_vocabulary_comes_from_the_data():
    import warnings

    from spectralds.cli_lightning import SpectraLDSCLI

    args = ["--config", TINY, f"--data.source={CORPUS}", "--data.tokenizer=bpe", "--data.bpe_vocab_size=300"]
    with warnings.catch_warnings():  # "args given while sys.argv is set too": intended here
        warnings.filterwarnings("ignore", message=".*args parameter is intended.*")
        cli = SpectraLDSCLI(args=args, run=False)
    assert cli.model.hparams.vocab_size == 320  # 300 padded to a multiple of 64
    assert cli.model.embed.num_embeddings == 320


@pytest.mark.parametrize(
    "model_len, data_len, expected",
    [(None, 48, (48, 48)), (64, None, (64, 64)), (64, 48, (64, 48)), (None, None, (256, 256))],
)
def test_seq_len_written_once(model_len, data_len, expected, tmp_path):
    """Where only one of model and data sets seq_len, the other follows; values that are written stay."""
    import warnings

    import yaml

    from spectralds.cli_lightning import SpectraLDSCLI

    config = yaml.safe_load(Path(TINY).read_text())
    config["model"]["init_args"].pop("seq_len")
    config["data"]["init_args"].pop("seq_len")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["--config", str(path), f"--data.source={CORPUS}"]
    args += [f"--model.init_args.seq_len={model_len}"] if model_len else []
    args += [f"--data.init_args.seq_len={data_len}"] if data_len else []
    with warnings.catch_warnings():  # "args given while sys.argv is set too": intended here
        warnings.filterwarnings("ignore", message=".*args parameter is intended.*")
        cli = SpectraLDSCLI(args=args, run=False)
    assert (cli.model.seq_len, cli.datamodule.seq_len) == expected


@pytest.mark.usefixtures("cli_env")
@pytest.mark.parametrize("written, expected", [(None, 256), (320, 320)])
def test_vocab_size_follows_the_tokenizer_unless_written(written, expected):
    from spectralds.cli_lightning import SpectraLDSCLI

    args = ["--config", TINY, f"--data.source={CORPUS}"]
    args += [] if written is None else [f"--model.init_args.vocab_size={written}"]
    cli = SpectraLDSCLI(args=args, run=False)
    assert cli.model.hparams.vocab_size == expected


def test_help_imports_neither_torch_nor_lightning():
    """`spectralds --help` answers at once: the commands' modules load only when they run."""
    import subprocess
    import sys

    code = ("import sys; from spectralds.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\n"
            "heavy = [m for m in ('torch', 'lightning', 'jsonargparse') if m in sys.modules]\n"
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage: spectralds" in done.stdout


def test_misspelt_layer_kwargs_name_is_refused(capsys):
    """layer_kwargs keyed by a name that is not a layer ("atn") would configure nothing: one line."""
    misspelt = '--model.init_args.layer_kwargs={"atn": {"num_heads": 2}}'
    err = one_line_error(capsys, ["fit", "--config", TINY, misspelt])
    assert "layer_kwargs names 'atn', which is not a layer" in err
