"""Third-party notices a `spectralds` user can do nothing about, silenced for the CLI's process.

Each entry names one message and the module that emits it, so our own warnings, Lightning's progress
and every real error still print (tests/cli/test_quiet_cli.py runs a tiny fit and checks its stderr):

- torchdata's StatefulDataLoader calls the deprecated `torch.set_vital` in every loader it builds;
- Lightning's pytree helper trips torch's own deprecation of `LeafSpec` at the first batch;
- Lightning advertises its cloud products (litlogger, litmodels) in every run ("Tip: ...");
- Lightning reports "TPU available: False, using: 0 TPU cores" on every machine without one.

Imports nothing heavy: `spectralds --help` must not import Lightning.
"""

from __future__ import annotations

import logging
import warnings

# (message regex, category, regex of the emitting module's name): warnings.filterwarnings' own fields.
NOISY_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    (r"'set_vital' is deprecated", UserWarning, r"torchdata\."),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\."),
)
# Starts of Lightning's rank-zero info lines that are advertisements or say "nothing here".
NOISY_LOG_STARTS: tuple[str, ...] = ("💡 Tip:", "TPU available: False, using: 0 TPU cores")
# The loggers Lightning's rank_zero_info writes through (pytorch's and fabric's; the last imported wins).
LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NOISY_LOG_STARTS)


_DROP_NOISE = _DropNoise()


def silence_third_party_noise() -> None:
    """Install the filters above (idempotent: a repeated call adds nothing)."""
    for message, category, module in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name in LIGHTNING_INFO_LOGGERS:
        logging.getLogger(name).addFilter(_DROP_NOISE)
