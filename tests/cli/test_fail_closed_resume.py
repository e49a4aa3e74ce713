"""Issue 26 §2: `fit --ckpt_path` after an edit of the model (dim, layer_pattern) or of the distillation's
state_dim. LightningCLI would put the checkpoint's values over the config's without a word (and write
them to config.yaml); each is refused in one line naming the key and both values, before the first step
and before config.yaml is written. An unchanged config resumes."""

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import one_line_error, run_cli, sha256s

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "tests" / "assets" / "configs" / "tiny_lm.yaml")
CORPUS = str(ROOT / "tests" / "assets" / "data" / "corpus")

pytestmark = pytest.mark.usefixtures("cli_env")


def base_args(*extra: str, steps: int = 2) -> list[str]:
    # logger off: the run's config.yaml goes to the run directory itself, where a resume rewrites it.
    return ["fit", "--config", TINY, f"--data.source={CORPUS}", f"--trainer.max_steps={steps}",
            "--trainer.logger=false", *extra]


def distill(tmp_path: Path, name: str, **init_args) -> str:
    path = tmp_path / f"{name}.yaml"
    init_args = {"max_fit_error": 1e-3, "log_plot": False, "validate": False, **init_args}
    path.write_text(json.dumps({"class_path": "spectralds.callbacks.STUToLDSDistillation",
                                "init_args": init_args}))
    return f"--trainer.callbacks+={path}"


def trained(capsys, *extra: str) -> Path:
    """A 2-step run in this directory; its last.ckpt."""
    assert run_cli(base_args(*extra)) == 0, capsys.readouterr().err[-2000:]
    capsys.readouterr()
    (last,) = Path.cwd().rglob("last.ckpt")
    assert (Path.cwd() / "config.yaml").is_file()  # what a resume must not rewrite when refused
    return last


def refused(capsys, tmp_path: Path, steps_taken: list[int], args: list[str], *expected: str) -> str:
    steps_taken.clear()
    before = sha256s(tmp_path, (TINY,))
    err = one_line_error(capsys, args)
    for piece in expected:
        assert piece in err, err
    after = sha256s(tmp_path, (TINY,))
    assert {k: after.get(k) for k in before} == before  # config.yaml and last.ckpt included
    assert set(after) == set(before) and steps_taken == []
    return err


@pytest.mark.parametrize("override, expected", [
    ("--model.init_args.dim=32", ["model dim is 32 in the config but 16 in the checkpoint"]),
    ("--model.init_args.layer_pattern=[attn,stu]",
     ["model layer_pattern is ['attn', 'stu'] in the config but ['stu', 'attn'] in the checkpoint"]),
    ("--model.init_args.num_layers=3", ["model num_layers is 3", "but 2 in the checkpoint"]),
    ("--model.init_args.layer_kwargs.attn.num_heads=4", ["model layer_kwargs is", "'num_heads': 4"]),
    ("--model.class_path=spectralds.models.SequenceRegression", ["holds a spectralds.models.LanguageModel"]),
])
def test_resuming_after_changing_the_model_is_refused(tmp_path, capsys, steps_taken, override, expected):
    last = trained(capsys)
    err = refused(capsys, tmp_path, steps_taken, base_args(override, f"--ckpt_path={last}", steps=3),
                  f"--ckpt_path {last}", *expected)
    assert "\n" not in err


def test_resuming_with_the_same_model_and_a_new_max_steps_goes_on(tmp_path, capsys, steps_taken):
    last = trained(capsys)
    steps_taken.clear()
    assert run_cli(base_args(f"--ckpt_path={last}", steps=3)) == 0, capsys.readouterr().err[-2000:]
    assert len(steps_taken) == 1 and torch.load(last, weights_only=True)["global_step"] == 3


def test_resuming_a_distilled_run_with_another_state_dim_is_refused(tmp_path, capsys, steps_taken):
    """Swapped at step 1 with 8 states; resumed with state_dim 4 the LDS layers would stay 8-state."""
    last = trained(capsys, distill(tmp_path, "distill8", state_dim=8, at_step=1))
    assert "blocks.0.mixer.A" in torch.load(last, weights_only=True)["state_dict"]
    refused(capsys, tmp_path, steps_taken,
            base_args(distill(tmp_path, "distill4", state_dim=4, at_step=1), f"--ckpt_path={last}", steps=3),
            "STUToLDSDistillation: state_dim is 4 in the config but the checkpoint", "distilled with 8")
    # The same state_dim resumes and trains the LDS model on.
    assert run_cli(base_args(distill(tmp_path, "distill8", state_dim=8, at_step=1), f"--ckpt_path={last}",
                             steps=3)) == 0, capsys.readouterr().err[-2000:]
    assert len(steps_taken) == 1 and torch.load(last, weights_only=True)["global_step"] == 3


def test_resuming_before_the_swap_honours_a_new_state_dim(tmp_path, capsys, steps_taken):
    """Not swapped yet: the state_dim the config names now is the one the swap uses."""
    last = trained(capsys)  # no distillation in the first run
    steps_taken.clear()
    args = base_args(distill(tmp_path, "distill4", state_dim=4, max_fit_error=1.0), f"--ckpt_path={last}",
                     steps=3)
    assert run_cli(args) == 0, capsys.readouterr().err[-2000:]
    (lds,) = Path.cwd().rglob("lds.ckpt")
    assert torch.load(lds, weights_only=True)["state_dict"]["blocks.0.mixer.A"].shape[0] == 4


def test_a_plain_trainer_restoring_a_distilled_state_of_another_state_dim_is_refused():
    """Without the CLI (no config.yaml to protect), Lightning's restore of the callback refuses it."""
    from spectralds.callbacks import STUToLDSDistillation
    from spectralds.errors import UserError

    state = {"done": True, "results": {}, "state_dim": 8, "method": None}
    expected = "^STUToLDSDistillation: state_dim is 4 in the config but the checkpoint was distilled with 8;"
    with pytest.raises(UserError, match=expected) as error:
        STUToLDSDistillation(state_dim=4).load_state_dict(state)
    assert "\n" not in str(error.value)
    STUToLDSDistillation(state_dim=8).load_state_dict(state)  # the same: restored
    STUToLDSDistillation(state_dim=4).load_state_dict({**state, "done": False})  # not swapped: honoured
