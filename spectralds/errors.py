"""One user-error type and the checks that raise it.

`UserError` is what the CLI prints as a single line: a problem with what the user gave (an argument, a
config value, a file). Anything else is a bug and keeps its traceback. It subclasses ValueError so that
library callers catching ValueError keep working.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


class UserError(ValueError):
    """Bad input: the message names the input and the problem, on one line."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def check_int(name: str, value: Any, minimum: int | None = 1, maximum: int | None = None) -> int:
    """An int (not a bool or a float) within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserTypeError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise UserError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise UserError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_float(
    name: str, value: Any, minimum: float | None = None, maximum: float | None = None, strict: bool = False
) -> float:
    """A finite real number within [minimum, maximum] (open at the minimum when `strict`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise UserError(f"{name} must be {'>' if strict else '>='} {minimum:g}, got {value!r}")
    if maximum is not None and value > maximum:
        raise UserError(f"{name} must be <= {maximum:g}, got {value!r}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """True or False (not 0/1, not a string: a YAML typo would otherwise pass as truthy)."""
    if not isinstance(value, bool):
        raise UserTypeError(f"{name} must be true or false, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    choices = tuple(choices)
    if value not in choices:
        raise UserError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def user_error_in(error: BaseException) -> UserError | None:
    """The UserError behind `error`, if any: jsonargparse and Lightning wrap what __init__ raises."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class StoppedRun(UserError):
    """A run stopped by a signal: printed as one line like any UserError, but the process exits with
    128 + the signal's number (143 for SIGTERM), as a shell reports a process the signal ended."""

    exit_code = 143


# The same user errors, also catchable as the built-in type a caller may already expect.
class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class NonFiniteError(UserError, FloatingPointError):
    """NaN or Inf where a finite value is needed (a loss, a weight)."""


class UserTypeError(UserError, TypeError):
    """A value of the wrong type in a config or an argument."""


class FileWriteError(UserError, OSError):
    """Writing a file failed (a full disk, a read-only directory); the message names the file."""
