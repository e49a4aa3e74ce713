"""`spectralds` command line: LightningCLI (fit/validate/test/predict) plus the commands in `COMMANDS`.

This is the one place where exceptions become one-line user errors (`spectralds: error: ...`, exit 2);
set SPECTRALDS_DEBUG=1 for the full traceback. Each command's module is imported only when it runs, so
`spectralds --help` answers without importing torch or Lightning.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable

from spectralds.cli_errors import check_config_files, parser_problem
from spectralds.cli_quiet import silence_third_party_noise
from spectralds.cli_signature import run_command
from spectralds.errors import UserError, first_line, user_error_in

# LightningCLI's subcommands (their options come from the Trainer and the config).
LIGHTNING_COMMANDS = {
    "fit": "train a model from --config files (LightningCLI)",
    "validate": "run one validation epoch of a model (LightningCLI)",
    "test": "run one test epoch of a model (LightningCLI)",
    "predict": "run prediction over a data module (LightningCLI)",
}
# Our own commands: name -> ("module:function", one-line help). The function's parameters are the
# command's options (spectralds.cli_signature builds them from its signature and docstring). Add one
# entry here; the module is imported when its command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("spectralds.cli_generate:generate", "generate text from a checkpoint"),
    "distill-filters": ("spectralds.cli_fits:distill_filters",
                        "fit one diagonal LDS to the spectral filters"),
    "import-fit": ("spectralds.cli_fits:import_fit",
                   "convert a released Flash STU 2 / SpectraLDS fit to ours, measured"),
    "import-model": ("spectralds.cli_models:import_model",
                     "a flash-stu-2 / SpectraLDS paper checkpoint as ours"),
    "distill": ("spectralds.cli_distill:distill",
                "distill a checkpoint's STU layers to LDS (optionally pruned), no training"),
    "export": ("spectralds.cli_export:export",
               "write a checkpoint as a transformers directory (or Flash STU 2's format)"),
    "eval": ("spectralds.cli_eval:evaluate",
             "lm-evaluation-harness tasks on several checkpoints, side by side"),
}


def command_function(name: str) -> Callable[..., None]:
    """The function behind a command of `COMMANDS`, its module imported now."""
    module, _, function = COMMANDS[name][0].partition(":")
    return getattr(importlib.import_module(module), function)


def print_help() -> None:
    lines = ["usage: spectralds <command> [options]", "", "commands:"]
    helps = {**LIGHTNING_COMMANDS, **{name: text for name, (_, text) in COMMANDS.items()}}
    lines += [f"  {name:<17} {text}" for name, text in helps.items()]
    lines += ["", "`spectralds <command> --help` lists a command's options."]
    print("\n".join(lines))


def _lightning_command(argv: list[str]) -> str:
    return next((a for a in argv if a in LIGHTNING_COMMANDS), "fit")


def run(argv: list[str], from_command_line: bool) -> None:
    """Dispatch one command line; raises what the command raises."""
    if not argv or argv[0] in ("-h", "--help"):
        print_help()
    elif argv[0] in COMMANDS:
        run_command(command_function(argv[0]), f"spectralds {argv[0]}", argv[1:])
    elif not argv[0].startswith("-") and argv[0] not in LIGHTNING_COMMANDS:
        names = ", ".join([*LIGHTNING_COMMANDS, *COMMANDS])
        raise UserError(f"unknown command {argv[0]!r}; commands: {names} (see `spectralds --help`)")
    else:
        check_config_files(argv)
        from spectralds.cli_lightning import run_lightning

        try:  # LightningCLI reads sys.argv itself and warns when given both
            run_lightning(None if from_command_line else argv)
        except argparse.ArgumentError as e:
            if user_error_in(e) is not None:
                raise
            help_hint = f"see `spectralds {_lightning_command(argv)} --help`"
            raise UserError(f"{parser_problem(e)} ({help_hint})") from e


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    silence_third_party_noise()
    try:
        run(argv, from_command_line)
    except Exception as e:
        user_error = user_error_in(e)
        if user_error is None and "Error(s) in loading state_dict" in str(e):
            # fit --ckpt_path: Lightning loads the weights itself
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            user_error = UserError(f"the checkpoint does not match the model: {lines[-1]}")
        if user_error is None or os.environ.get("SPECTRALDS_DEBUG"):
            raise
        sys.stderr.write(f"spectralds: error: {first_line(user_error)}\n")  # one write: DDP ranks interleave
        sys.exit(getattr(user_error, "exit_code", 2))


if __name__ == "__main__":
    main()
