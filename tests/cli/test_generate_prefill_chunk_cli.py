"""`spectralds generate --prefill-chunk N`: the same text as one prefill; a bad N is a one-line error that
changes no file."""

import pytest
from cli_helpers import run_cli
from test_adversarial_cli import fails, generate, lightning_checkpoint

pytestmark = pytest.mark.usefixtures("cli_env")


def test_prefill_chunk_gives_the_text_of_one_prefill(capsys, tmp_path):
    ckpt = lightning_checkpoint(tmp_path / "model.ckpt")
    base = ["generate", "--ckpt", str(ckpt), "--max-new-tokens", "6"]
    prompts = ["--prompt", "def f(x): return x", "--prompt", "ab"]  # 18 and 2 tokens
    capsys.readouterr()
    assert run_cli([*base, *prompts]) == 0
    expected = capsys.readouterr().out
    for chunk in ("1", "4", "17"):
        assert run_cli([*base, *prompts, "--prefill-chunk", chunk]) == 0
        assert capsys.readouterr().out == expected


@pytest.mark.parametrize(
    "value, expected",
    [("0", "--prefill-chunk must be >= 1, got 0"), ("abc", "--prefill-chunk: invalid int value: 'abc'")],
)
def test_bad_prefill_chunk(value, expected, capsys, tmp_path):
    ckpt = lightning_checkpoint(tmp_path / "model.ckpt")
    fails(capsys, tmp_path, generate(ckpt, "--prefill-chunk", value), expected)
