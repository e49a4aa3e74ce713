"""The README's "Bring your own model" walk-through runs as written: each of its lines, in a fresh folder."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]


def readme_block(heading: str) -> list[str]:
    """The commands of the first ```bash block after `heading`, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    after = text[text.index(heading):]
    block = after[after.index("```bash\n") + len("```bash\n"):]
    block = block[: block.index("```")]
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_the_walk_through_is_where_the_test_expects_it():
    lines = readme_block("## Bring your own model")
    commands = [line.split()[1] for line in lines[:4] if line.startswith("spectralds ")]
    assert commands == ["import-model", "distill", "eval", "export"]
    assert lines[4].startswith("python -c")


@pytest.mark.slow  # imports, fits, evaluates and exports: about a minute on 2 cores
def test_bring_your_own_model_walk_through(cli_env, tmp_path, capsys):
    for name in ("tests", "spectralds"):  # the commands name repository paths, as from a fresh clone
        os.symlink(ROOT / name, tmp_path / name)
    for line in readme_block("## Bring your own model"):
        args = shlex.split(line)
        if args[0] == "spectralds":
            assert run_cli(args[1:]) == 0, line
        else:
            done = subprocess.run([sys.executable, *args[1:]], cwd=tmp_path, capture_output=True, text=True,
                                  timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert done.returncode == 0, done.stderr
            assert "SpectralDSForCausalLM" in done.stdout
    out = capsys.readouterr().out
    assert "STU -> LDS distillation" in out and "distilled - imported" in out

    from spectralds.checkpoint_io import load_model
    from spectralds.interop.hf_model import SpectralDSForCausalLM

    ours = load_model(tmp_path / "byom" / "lds.ckpt").eval()
    theirs = SpectralDSForCausalLM.from_pretrained(tmp_path / "byom" / "hf").eval()
    x = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(theirs(x).logits, ours(x))
