"""The package's import arrows point one way (see README's Layout): a module imports only from its own
level or from the levels below it, so every concern can be read, tested and replaced from the bottom up."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "spectralds"

# Level of each top-level part of the package; a module may import parts of its own level or lower.
LEVELS = {
    "errors": 0, "io": 1, "compat": 1,
    "filters": 2, "ops": 2, "data": 2,
    "layers": 3,
    "distill": 4, "generate": 4, "checkpoint_io": 4,
    "evaluation": 5,
    "callbacks": 6,  # may run an evaluation (StageReport)
    "models": 7,  # install default callbacks (TokenThroughput)
    "interop": 8,
    "config_rules": 8,  # what completes a fit config (seq_len, vocab_size): used by the CLI only
    "cli": 9,
}


def _part(module_path: Path) -> str:
    rel = module_path.relative_to(PACKAGE)
    name = rel.parts[0].removesuffix(".py")
    return "cli" if name.startswith("cli") or name == "__main__" else name


def _imported_parts(module_path: Path) -> set[str]:
    parts = set()
    for node in ast.walk(ast.parse(module_path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if name.startswith("spectralds."):
                part = name.split(".")[1]
                parts.add("cli" if part.startswith("cli") else part)
    return parts


def test_every_part_of_the_package_has_a_level():
    parts = {_part(p) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE}
    assert parts <= set(LEVELS), f"give these a level in LEVELS: {sorted(parts - set(LEVELS))}"


def test_no_module_imports_upward():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent == PACKAGE and path.name == "__init__.py":
            continue
        source = _part(path)
        for target in _imported_parts(path):
            if target in LEVELS and LEVELS[target] > LEVELS[source]:
                upward.append(f"{path.relative_to(PACKAGE.parent)} ({source}) imports {target}")
    assert not upward, "imports against the arrows:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("from spectralds.cli import main\nimport spectralds.models.lm\n")
    assert _imported_parts(bad) == {"cli", "models"}
