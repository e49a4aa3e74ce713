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
import stat
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


# A config is a few kB; jsonargparse reads a file whole, so /dev/zero or a huge file would fill memory.
MAX_CONFIG_BYTES = 2**20


def _config_values(argv: list[str]) -> list[str]:
    values = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif arg.startswith("--config="):
            values.append(arg.split("=", 1)[1])
    return values


def _option_values(argv: list[str]) -> list[tuple[str, str]]:
    """(option, value) of every value on the command line (`--key=value`, or the word after an option):
    jsonargparse reads one naming an existing file as a config (`--trainer.callbacks+=distill.yaml`)."""
    pairs = [tuple(arg.split("=", 1)) for arg in argv if arg.startswith("-") and "=" in arg]
    return pairs + [(prev, arg) for prev, arg in zip(argv, argv[1:], strict=False)
                    if prev.startswith("-") and "=" not in prev and not arg.startswith("-")]


def _check_readable_size(value: str, what: str) -> None:
    """A regular file (not a FIFO or a device such as /dev/zero) of at most MAX_CONFIG_BYTES."""
    try:
        info = os.stat(value)  # stat, not open: opening a FIFO would block
    except OSError:
        return  # a value that is not a path (the caller checks what must exist)
    if stat.S_ISDIR(info.st_mode):
        return
    what = what if what == "config file" else f"{what} value"
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{what} {value} is not a regular file (a device or a FIFO cannot be read as YAML)")
    if info.st_size > MAX_CONFIG_BYTES and (what == "config file" or value.endswith((".yaml", ".yml"))):
        raise UserError(f"{what} {value} has {info.st_size:,} bytes, more than a config's "
                        f"{MAX_CONFIG_BYTES:,}: is it the right file?")


def check_config_files(argv: list[str]) -> None:
    """Each --config file exists, is a regular file of a config's size, and holds a non-empty YAML
    mapping; no option value names a FIFO or a device: one line naming it."""
    configs = _config_values(argv)
    for option, value in _option_values(argv):
        if option not in ("--config", "-c"):
            _check_readable_size(value, option)
    for value in configs:
        if "\n" in value or value.lstrip().startswith("{"):
            continue  # an inline config, which jsonargparse also accepts
        path = Path(value)
        if path.is_dir():
            raise UserError(f"config {value} is a directory, not a YAML file")
        if not path.exists():
            raise UserError(f"config file {value} does not exist")
        _check_readable_size(value, "config file")
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
