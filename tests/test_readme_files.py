"""Every repository file the README names is shipped (a newcomer copies those command lines as they are)."""

import glob
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# A repository path: a top-level folder first, after a space, quote, bracket or `=` (`+=callbacks/...`).
PATH = re.compile(r"(?:^|(?<=[\s`(\[=]))((?:configs|tools|docs|tests|spectralds|callbacks)/[\w./{},*+-]*)")
PLACEHOLDERS = re.compile(r"(^|/)[XV](/|\.yaml|$)")  # configs/X.yaml, configs/X/V.yaml: names for any config


def _expanded(path: str) -> list[str]:
    """configs/synthetic/{lds,attn}.yaml -> both files."""
    braces = re.search(r"\{([^}]*)\}", path)
    if braces is None:
        return [path]
    return [p for alt in braces.group(1).split(",")
            for p in _expanded(path[: braces.start()] + alt + path[braces.end():])]


def readme_paths() -> list[str]:
    found = {m.group(1).rstrip(".,") for m in PATH.finditer(README)}
    return sorted(p for path in found if not PLACEHOLDERS.search(path) for p in _expanded(path))


def test_every_path_the_readme_names_exists():
    paths = readme_paths()
    assert "docs/examples/prompts.txt" in paths and "callbacks/prune.yaml" in paths  # the regex finds them
    missing = [p for p in paths if not glob.glob(str(ROOT / p))]
    assert missing == []


def test_every_tool_in_the_benchmarks_table_exists():
    section = README[README.index("## Benchmarks"):README.index("## Layout")]
    tools = re.findall(r"^\| `([\w.]+\.(?:py|sh))` \|", section, flags=re.M)
    assert len(tools) >= 10
    assert [t for t in tools if not (ROOT / "tools" / t).is_file()] == []


def test_the_example_prompts_file_is_a_valid_prompts_file():
    from spectralds.cli_generate import _read_prompts

    prompts = _read_prompts(str(ROOT / "docs" / "examples" / "prompts.txt"))
    assert len(prompts) >= 2 and all(p.strip() for p in prompts)
