"""`spectralds generate` with several prompts (--prompt repeated, --prompts-file): one batch, each completion
as the prompt gets alone; bad prompt input is a one-line error."""

from pathlib import Path

import pytest
from cli_helpers import one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "tests" / "assets" / "configs" / "tiny_lm.yaml")
CORPUS = str(ROOT / "tests" / "assets" / "data" / "corpus")

pytestmark = pytest.mark.usefixtures("cli_env")


def test_generate_several_prompts_and_bad_prompt_input(tmp_path, capsys):
    args = ["fit", "--config", TINY, f"--data.source={CORPUS}", "--trainer.logger.init_args.name=gen"]
    assert run_cli(args) == 0
    ckpt = next((tmp_path / "runs" / "gen" / "version_0" / "checkpoints").glob("*.ckpt"))
    base = ["generate", "--ckpt", str(ckpt), "--max-new-tokens", "8"]
    capsys.readouterr()
    texts = ["def f(", "x", "import os\tclass", "ab"]

    def alone(text: str) -> str:
        assert run_cli([*base, "--prompt", text]) == 0
        return capsys.readouterr().out

    expected = [alone(text) for text in texts]
    assert all(out.startswith(text) for out, text in zip(expected, texts, strict=True))
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(texts[2:]) + "\n", encoding="utf-8")
    several = ["--prompt", texts[0], "--prompt", texts[1], "--prompts-file", str(prompts_file)]
    assert run_cli([*base, *several]) == 0
    out = capsys.readouterr().out
    assert out == "".join(f"=== completion {i + 1}/4 ===\n{e}" for i, e in enumerate(expected))

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "prompts file" in one_line_error(capsys, [*base, "--prompts-file", str(empty)])
    gap = tmp_path / "gap.txt"
    gap.write_text("one\n\nthree\n")
    assert "line 2 of the prompts file" in one_line_error(capsys, [*base, "--prompts-file", str(gap)])
    missing = str(tmp_path / "missing.txt")
    assert "cannot read the prompts file" in one_line_error(capsys, [*base, "--prompts-file", missing])
    assert "required: --prompt (or --prompts-file)" in one_line_error(capsys, base)
    negative = [*base, "--prompt", "x", "--max-new-tokens", "0"]
    assert "--max-new-tokens must be >= 1" in one_line_error(capsys, negative)


def test_decode_method_the_model_cannot_use_is_refused(tmp_path, capsys):
    """--decode picks how STU layers decode; asked of a model without them (a distilled LDS): one line."""
    assets = ROOT / "tests" / "assets" / "flash_stu_2_tiny"
    assert run_cli(["import-model", str(assets), "--tokenizer", "byte", "--out", "stu.ckpt"]) == 0
    assert run_cli(["distill", "--ckpt", "stu.ckpt", "--out", "lds.ckpt"]) == 0
    capsys.readouterr()
    assert run_cli(["generate", "--ckpt", "stu.ckpt", "--prompt", "def", "--max-new-tokens", "3",
                    "--decode", "naive"]) == 0
    err = one_line_error(capsys, ["generate", "--ckpt", "lds.ckpt", "--prompt", "def", "--decode", "naive"])
    assert "--decode naive" in err and "no layer" in err
