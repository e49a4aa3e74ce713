"""spectralds.cli_signature: a command's options are its function's parameters, documented once."""

import argparse
import inspect
from collections.abc import Sequence
from typing import Annotated, Literal

import pytest
from cli_helpers import one_line_error

from spectralds.cli import COMMANDS, command_function
from spectralds.cli_signature import command_parser, docstring_parts, library_defaults, run_command
from spectralds.errors import UserError

SIZES = ("small", "large")


def _pair(text: str) -> tuple[int, int]:
    a, sep, b = text.partition("x")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected AxB, got {text!r}")
    return int(a), int(b)


def toy(
    source: str,
    *,
    out: str,
    count: int = 3,
    scale: float | None = None,
    size: Literal[SIZES] = "small",
    tag: Sequence[str] = (),
    shape: Annotated[tuple[int, int], _pair] = (2, 2),
    quiet: bool = False,
) -> dict:
    """A toy command.

    Second paragraph of the description.

    Args:
        source: where from
        out: where to
        count: how many, spread
            over two lines
        scale (float): how large (None: unscaled)
        size: which size
        tag: a tag; repeat it
        shape: AxB
        quiet: say nothing

    Returns:
        what it was given
    """
    return dict(locals())


def test_docstring_parts():
    description, helps = docstring_parts(toy)
    assert description == "A toy command. Second paragraph of the description."
    assert helps["count"] == "how many, spread over two lines"
    assert helps["scale"] == "how large (None: unscaled)"  # a "(type)" after the name is left out
    assert list(helps) == list(inspect.signature(toy).parameters)  # "Returns:" ends the section


def test_the_command_line_of_a_signature():
    given = run_command(toy, "toy", ["src", "--out", "o", "--count", "5", "--size", "large", "--tag", "a",
                                     "--tag", "b", "--shape", "3x4", "--quiet", "--scale", "0.5"])
    assert given == {"source": "src", "out": "o", "count": 5, "scale": 0.5, "size": "large",
                     "tag": ["a", "b"], "shape": (3, 4), "quiet": True}
    defaults = run_command(toy, "toy", ["src", "--out", "o"])
    assert defaults == {"source": "src", "out": "o", "count": 3, "scale": None, "size": "small", "tag": [],
                        "shape": (2, 2), "quiet": False}
    again = run_command(toy, "toy", ["src", "--out", "o", "--tag", "c"])
    assert again["tag"] == ["c"] and inspect.signature(toy).parameters["tag"].default == ()  # not shared


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["src"], "the following arguments are required: --out (see `toy --help`)"),
        (["src", "--out", "o", "--count", "x"], "argument --count: invalid int value: 'x'"),
        (["src", "--out", "o", "--size", "huge"], "argument --size: invalid choice: 'huge'"),
        (["src", "--out", "o", "--shape", "3"], "argument --shape: expected AxB, got '3'"),
        (["src", "--out", "o", "--cuont", "3"], "unrecognized arguments: --cuont 3"),
    ],
)
def test_bad_values_are_one_user_error_naming_the_option(argv, expected):
    with pytest.raises(UserError) as error:
        run_command(toy, "toy", argv)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_help_shows_defaults_choices_and_required():
    help_text = " ".join(command_parser(toy, "toy").format_help().split())
    assert "--out OUT where to (required)" in help_text
    assert "--count COUNT how many, spread over two lines (default: 3)" in help_text
    assert "--size {small,large} which size (default: small)" in help_text


def test_an_undocumented_parameter_is_a_programming_error():
    def command(*, documented: int = 1, forgotten: int = 2) -> None:
        """Command.

        Args:
            documented: yes
        """

    with pytest.raises(TypeError, match="forgotten is not documented"):
        command_parser(command, "command")


def test_every_command_builds_its_parser():
    for name in COMMANDS:
        function = command_function(name)
        parser = command_parser(function, f"spectralds {name}")
        assert parser.description and not parser.description.startswith("Args")


def test_command_defaults_are_the_library_defaults():
    """The defaults a command shares with the library function it calls are that function's."""
    from spectralds.distill import fit_filters
    from spectralds.distill.swap import distill_stu_layers, layer_fit
    from spectralds.evaluation.run import evaluate_models
    from spectralds.generate import generate as generate_tokens

    pairs = [
        ("distill-filters", fit_filters, ("variant", "method")),
        ("eval", evaluate_models, ("batch_size", "decode", "num_fewshot", "limit")),
        ("generate", generate_tokens, ("temperature", "top_k")),
        ("distill", distill_stu_layers, ("max_fit_error",)),
        ("distill", layer_fit, ("state_dim",)),
    ]
    for name, library, parameters in pairs:
        ours, theirs = library_defaults(command_function(name)), library_defaults(library)
        assert {p: ours[p] for p in parameters} == {p: theirs[p] for p in parameters}, name


def test_distill_filters_states_default_to_the_distillations_rule(tmp_path, capsys):
    from spectralds.distill.swap import default_state_dim

    out = tmp_path / "fit.safetensors"
    run_command(command_function("distill-filters"), "spectralds distill-filters",
                ["--seq-len", "64", "--num-filters", "4", "--out", str(out), "--no-progress"])
    assert f"wrote {out}: {default_state_dim(64)} states" in capsys.readouterr().out


@pytest.mark.usefixtures("cli_env")
def test_generate_without_a_prompt_points_at_its_help(capsys, tmp_path):
    err = one_line_error(capsys, ["generate", "--ckpt", str(tmp_path / "none.ckpt")])
    assert "required: --prompt (or --prompts-file) (see `spectralds generate --help`)" in err
