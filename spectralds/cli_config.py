"""Config files as `spectralds fit` reads them: the --print_config flags, and `resolved_config`, the config a
stack of `--config` files (base, then variants) resolves to, for tools and tests that build from it."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import warnings
from collections.abc import Sequence
from typing import Any

import yaml

from spectralds.errors import UserError

# --print_config's flags -> dump() options (the ones jsonargparse takes).
PRINT_FLAGS = {"skip_default": "skip_default", "skip_unset": "skip_unset", "comments": "with_comments"}


def split_print_config(argv: list[str]) -> tuple[list[str], dict[str, bool] | None]:
    """`argv` without `--print_config[=flag,...]`, and the dump options its flags ask for (None when
    not given)."""
    rest, options = [], None
    for arg in argv:
        name, _, flags = arg.partition("=")
        if name != "--print_config":
            rest.append(arg)
            continue
        options = options or {}
        for flag in filter(None, flags.split(",")):
            if flag not in PRINT_FLAGS:
                raise UserError(f"--print_config takes the flags {', '.join(PRINT_FLAGS)}; got {flag!r}")
            if flag == "comments" and importlib.util.find_spec("ruamel") is None:
                raise UserError("--print_config=comments needs ruamel.yaml (pip install ruamel.yaml)")
            options[PRINT_FLAGS[flag]] = True
    return rest, options


def resolved_config(configs: Sequence[str | os.PathLike], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """What `spectralds fit --config C1 --config C2 ... OVERRIDES --print_config` prints, as a dict: later
    files override earlier ones as on the command line (a list or a `dict` value replaces the earlier
    one, class init_args merge), derived seq_len and linked vocab_size filled in where they can be."""
    from spectralds.cli import run

    argv = ["fit", *(arg for c in configs for arg in ("--config", str(c))), *overrides, "--print_config"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended.*")  # sys.argv is not ours
        try:
            run(argv, from_command_line=False)
        except SystemExit as e:  # --print_config exits after printing
            if e.code not in (0, None):
                raise UserError(f"the configs {', '.join(map(str, configs))} do not resolve") from e
    config = yaml.safe_load(printed.getvalue())
    if not isinstance(config, dict):
        raise UserError(f"the configs {', '.join(map(str, configs))} printed no config")
    return config
