"""One line for what jsonargparse rejects: the key and the real problem, not 50 lines of usage.

jsonargparse (with ``exit_on_error=False``) raises an ArgumentError whose message nests every level
("Parser key "model": ... Problem with given class_path ...: Parser key "dim": Expected ...") and
whose ``__cause__`` chain holds each level on its own; `parser_problem` walks that chain.

The chain is structured (one exception per level; ImportError/AttributeError tell a class that cannot be
imported), but each level's key and problem are not: jsonargparse (4.53) raises plain TypeError and
ValueError whose only record of the key, the class_path or the given value is the message text
('Parser key "dim": ...', "Expected a <class 'int'>. Got value: x"), with no attribute to read them
from. The regexes below read only that text, which has no structured alternative.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from spectralds.errors import UserError, first_line

_KEY = re.compile(r'^Parser key "([^"]+)":\s*(.*)$')
_CLASS_PATH = re.compile(r"^Problem with given class_path '([^']+)':")
_CLASS_REPR = re.compile(r"<class '([\w.]+)'>")
_EXPECTED = re.compile(r"^Expected an? (.+?)\. Got value: (.*)$")
# Lines of jsonargparse's Union report that are never the problem itself.
_NOISE = ("Does not validate against any of", "Subtypes:", "Errors:", "Given value", "- Expected a NoneType")


def _chain(error: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def parser_problem(error: BaseException) -> str:
    """`key.path: problem` from a jsonargparse error (or its first line when it has no such chain)."""
    keys: list[str] = []
    class_path, problem, imported = None, "", False
    for link in _chain(error):
        line = first_line(link)
        if isinstance(link, (ImportError, AttributeError)):
            imported = True
        if (key := _KEY.match(line)) is not None:
            if not keys or keys[-1] != key.group(1):
                keys.append(key.group(1))
            problem = key.group(2) or problem
        elif (given := _CLASS_PATH.match(line)) is not None:
            class_path = given.group(1)
            keys.append("init_args")
        elif not line.startswith(_NOISE):
            problem = line
    if class_path is not None and imported:  # the class itself, not one of its arguments, is the problem
        keys = keys[: keys.index("init_args")] + ["class_path"]
        problem = f"cannot import {class_path!r} ({problem})"
    if keys and keys[-1] == "init_args" and problem.startswith("Key "):
        keys.pop()
    problem = _CLASS_REPR.sub(r"\1", problem or first_line(error)).rstrip(":")
    if (expected := _EXPECTED.match(problem)) is not None:
        problem = f"expected {expected.group(1)}, got {expected.group(2)!r}"
    return f"{'.'.join(keys)}: {problem}" if keys else problem


def _config_values(argv: list[str]) -> list[str]:
    values = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif arg.startswith("--config="):
            values.append(arg.split("=", 1)[1])
    return values


def check_config_files(argv: list[str]) -> None:
    """Each --config file exists, is a file, and holds a non-empty YAML mapping: one line naming it."""
    for value in _config_values(argv):
        if "\n" in value or value.lstrip().startswith("{"):
            continue  # an inline config, which jsonargparse also accepts
        path = Path(value)
        if path.is_dir():
            raise UserError(f"config {value} is a directory, not a YAML file")
        if not path.exists():
            raise UserError(f"config file {value} does not exist")
        if not os.access(path, os.R_OK):
            raise UserError(f"config file {value} is not readable")
        try:
            content = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
            raise UserError(f"config file {value} is not valid YAML ({first_line(e)})") from e
        if content is None:
            raise UserError(f"config file {value} is empty")
        if not isinstance(content, dict):
            kind = type(content).__name__
            raise UserError(f"config file {value} must hold a mapping (trainer:, model:, ...), not a {kind}")


def usage_error(prog: str, message: str) -> UserError:
    """A command line a command cannot run, pointing at its --help."""
    return UserError(f"{message} (see `{prog} --help`)")
