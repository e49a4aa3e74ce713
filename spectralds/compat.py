"""Every private Lightning / jsonargparse access in spectralds, one small function each.

Lightning has no public way to run the fit's validation loop from inside a training step (a mid-run
layer swap validates before and after), so that loop's bookkeeping flag is saved and restored here;
jsonargparse has no public lenient parse for "what did the user write", and LightningCLI no public way
to the subcommand parser that prints its section for --print_config; ModelCheckpoint has no public way
to save its last checkpoint now (the end of training, before a callback changes the layers).
tests/test_compat.py checks that each attribute below still exists, so an upgrade that renames one
fails there, loudly, instead of mid-run. Tested with lightning 2.6 (pinned <2.7) and jsonargparse 4.53.
Keep this a flat list of small functions, and list every private Trainer attribute path in
TRAINER_ATTRIBUTES (LightningCLI methods in CLI_ATTRIBUTES, ModelCheckpoint's in CHECKPOINT_ATTRIBUTES).
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L

# Dotted private attribute paths on a Trainer instance that the functions below use.
TRAINER_ATTRIBUTES: tuple[str, ...] = ("_logger_connector", "_logger_connector._first_loop_iter")
# Private LightningCLI methods that the functions below use.
CLI_ATTRIBUTES: tuple[str, ...] = ("_parser",)
# Private ModelCheckpoint attributes that the functions below use.
CHECKPOINT_ATTRIBUTES: tuple[str, ...] = (
    "_last_global_step_saved", "_last_checkpoint_saved", "_monitor_candidates", "_save_last_checkpoint",
)


def first_loop_iter(trainer: L.Trainer) -> bool | None:
    """The logger connector's "first batch of the loop" flag, which a nested validation run resets."""
    return trainer._logger_connector._first_loop_iter


def set_first_loop_iter(trainer: L.Trainer, value: bool | None) -> None:
    """Restore the flag read by `first_loop_iter` (as Lightning's own mid-epoch validation does)."""
    trainer._logger_connector._first_loop_iter = value


def parse_written(parser: Any, args: list[str] | None) -> Any:
    """What the config files and the command line wrote, without the parser's defaults.

    Private: `jsonargparse._common.parser_context(lenient_check=True)`. The public
    `parse_args(defaults=False)` alone fails on required arguments that only defaults supply (the
    logger's save_dir when the command line sets its name).
    """
    from jsonargparse._common import parser_context

    with parser_context(lenient_check=True):
        return parser.parse_args(args, defaults=False)


def subcommand_parser(cli: Any, subcommand: str | None) -> Any:
    """The parser of a LightningCLI subcommand (the main parser for None): the one that dumps that
    subcommand's section of the config. Private: `LightningCLI._parser`; jsonargparse keeps its
    subcommand parsers private too."""
    return cli._parser(subcommand)


def checkpoint_step_saved(checkpoint: Any) -> int:
    """The global step a ModelCheckpoint last saved at (Lightning keeps no public record of it)."""
    return checkpoint._last_global_step_saved


def save_last_checkpoint(checkpoint: Any, trainer: L.Trainer) -> None:
    """Make a ModelCheckpoint that keeps a last checkpoint save it now, under its own name and
    bookkeeping (version counter, the previous last removed, `last_model_path`), so that its own hooks
    then know this step is saved. With save_last="link" it would link to its newest interval checkpoint,
    an earlier step: that link is replaced by a file of this step."""
    if checkpoint.save_last == "link":
        checkpoint._last_checkpoint_saved = ""
        if checkpoint.last_model_path and os.path.islink(checkpoint.last_model_path):
            os.remove(checkpoint.last_model_path)  # not written through into the file it points at
    checkpoint._save_last_checkpoint(trainer, checkpoint._monitor_candidates(trainer))
