"""A command line from a typed, documented function: the function's parameters ARE the command's options.

Every command of `spectralds.cli.COMMANDS` is a plain Python function. `command_parser` builds its
argparse parser from the signature (names, types, defaults) and the docstring (its text before
"Args:" is the description, each entry under "Args:" an option's help), so an option's default is
written once, in the signature, which takes it from the library. The rules:

- a parameter before ``*`` is a positional argument (optional when it has a default); a keyword-only
  one is ``--its-name`` (underscores become dashes), required when it has no default;
- ``int``, ``float`` and ``str`` (``| None`` allowed) are argparse types; ``bool = False`` is a flag;
  ``Literal[...]`` lists the choices; ``list[X]`` or ``Sequence[X]`` is an option repeated once per value;
  ``Annotated[T, parse]`` converts the text with ``parse`` (which raises argparse.ArgumentTypeError);
- every parameter is documented under "Args:" (tests/cli/test_cli_signature.py checks every command); a
  help text may name a constant of the function's module in braces, ``{STATE_DIM_RULE}``, to show a
  library rule without restating it.

jsonargparse's ``CLI(function)`` (as litgpt uses) was tried first and does not keep the project's rules:
it spells options with underscores (``--max_new_tokens``), turns required parameters into positional
arguments, and reports a bad value over several lines ("Parser key ...: Expected a <class 'int'>. Got
value: x") that would have to be parsed back into one.
"""

from __future__ import annotations

import argparse
import inspect
import re
import types
import typing
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal, NoReturn, get_args, get_origin, get_type_hints

from spectralds.cli_errors import usage_error

_ENTRY = re.compile(r"^    (\w+)(?: \([^)]*\))?:\s*(.*)$")  # "    name: text" or "    name (type): text"
_CONSTANT = re.compile(r"\{([A-Z][A-Z0-9_]*)\}")  # "{STATE_DIM_RULE}" in a help text


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help; a required option says so instead of "(default: None)"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required and action.option_strings:
            return f"{action.help} (required)"
        return super()._get_help_string(action)


class CommandParser(argparse.ArgumentParser):
    """argparse for our own commands: defaults in --help, errors as one UserError line."""

    def __init__(self, prog: str, description: str) -> None:
        super().__init__(prog=prog, description=description, formatter_class=_HelpFormatter)

    def error(self, message: str) -> NoReturn:  # argparse would print its usage and exit
        raise usage_error(self.prog, message)


def docstring_parts(function: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    """(the description, {parameter: help}) of a Google-style docstring."""
    description, _, args = (inspect.getdoc(function) or "").partition("\nArgs:\n")
    helps: dict[str, str] = {}
    name = None
    for line in args.splitlines():
        if line.strip() and not line.startswith(" "):
            break  # the next section (Returns:, ...)
        if (entry := _ENTRY.match(line)) is not None:
            name = entry.group(1)
            helps[name] = entry.group(2)
        elif name is not None and line.strip():
            helps[name] += " " + line.strip()

    def fill(text: str) -> str:
        return _CONSTANT.sub(lambda m: str(function.__globals__[m.group(1)]), text)

    return fill(" ".join(description.split())), {name: fill(text) for name, text in helps.items()}


def _without_none(hint: Any) -> Any:
    if get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in get_args(hint) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return hint


def _argument(name: str, parameter: inspect.Parameter, hint: Any, help_text: str) -> dict[str, Any]:
    """add_argument's keywords for one parameter."""
    kwargs: dict[str, Any] = {"help": help_text.replace("%", "%%")}
    if parameter.default is not inspect.Parameter.empty:
        kwargs["default"] = parameter.default
        if parameter.kind is not inspect.Parameter.KEYWORD_ONLY:
            kwargs["nargs"] = "?"  # a positional argument that may be left out
    elif parameter.kind is inspect.Parameter.KEYWORD_ONLY:
        kwargs["required"] = True
    hint = _without_none(hint)
    if get_origin(hint) is Annotated:  # Annotated[T, parse]: `parse` converts the text
        return {**kwargs, "type": get_args(hint)[1]}
    if hint is bool:
        if parameter.default is not False:
            raise TypeError(f"{name}: a bool option is a flag, default False")
        return {**kwargs, "action": "store_true"}
    if get_origin(hint) is Literal:
        choices = get_args(hint)
        return {**kwargs, "choices": choices, "type": type(choices[0])}
    if get_origin(hint) in (list, Sequence) and get_args(hint)[0] in (int, float, str):
        if kwargs.get("default") is not None:  # argparse appends to a copy of a list default, not a tuple
            kwargs["default"] = list(kwargs["default"])
        return {**kwargs, "action": "append", "type": get_args(hint)[0]}
    if hint in (int, float, str):
        return {**kwargs, "type": hint}
    raise TypeError(f"{name}: no command-line form for the type {hint}")


def command_parser(function: Callable[..., Any], prog: str) -> CommandParser:
    """The parser whose options are `function`'s parameters (see the module doc)."""
    description, helps = docstring_parts(function)
    hints = get_type_hints(function, include_extras=True)
    parser = CommandParser(prog, description)
    for name, parameter in inspect.signature(function).parameters.items():
        if name not in helps:
            raise TypeError(f"{function.__name__}: parameter {name} is not documented under Args:")
        kwargs = _argument(name, parameter, hints[name], helps[name])
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY:
            parser.add_argument("--" + name.replace("_", "-"), dest=name, **kwargs)
        else:
            parser.add_argument(name, **kwargs)
    return parser


def run_command(function: Callable[..., Any], prog: str, argv: list[str]) -> Any:
    """Parse `argv` by `function`'s signature and call it."""
    return function(**vars(command_parser(function, prog).parse_args(argv)))


def library_defaults(function: Callable[..., Any]) -> dict[str, Any]:
    """{parameter: default} of a library function (or class): a command takes its defaults from the
    function it calls, so that none is written twice (`DEFAULTS["name"]` in its signature)."""
    parameters = inspect.signature(function).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
