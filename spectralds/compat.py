"""Every use of a private Lightning attribute in spectralds, one small function each.

Lightning has no public way to run the fit's validation loop from inside a training step (a mid-run
layer swap validates before and after), so that loop's bookkeeping flag is saved and restored here.
tests/test_compat.py checks that each attribute below still exists, so a Lightning upgrade that renames
one fails there, loudly, instead of mid-run. Keep this a flat list of small functions (other branches
add theirs), and list every private attribute path in TRAINER_ATTRIBUTES.
"""

from __future__ import annotations

import lightning as L

# Dotted private attribute paths on a Trainer instance that the functions below use.
TRAINER_ATTRIBUTES: tuple[str, ...] = ("_logger_connector", "_logger_connector._first_loop_iter")


def first_loop_iter(trainer: L.Trainer) -> bool | None:
    """The logger connector's "first batch of the loop" flag, which a nested validation run resets."""
    return trainer._logger_connector._first_loop_iter


def set_first_loop_iter(trainer: L.Trainer, value: bool | None) -> None:
    """Restore the flag read by `first_loop_iter` (as Lightning's own mid-epoch validation does)."""
    trainer._logger_connector._first_loop_iter = value
