"""Running `spectralds` in-process from tests (the fixture `cli_env` in conftest.py isolates each run)."""

import hashlib
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from spectralds.cli import main
from spectralds.layers import build_layer


def run_cli(args: list[str]) -> int:
    """`spectralds <args>`; returns its exit status."""
    try:
        main(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def one_line_error(capsys, args: list[str]) -> str:
    """Run a command that must fail with exit status 2 and one `spectralds: error:` line; return it."""
    assert run_cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spectralds: error:") and "Traceback" not in err and "\n" not in err
    return err


def sha256s(root: Path, also: tuple = ()) -> dict[str, str]:
    """Content hash of every regular file under `root` (symlinks skipped) and of the files in `also`."""
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()] + [Path(f) for f in also]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def fails(capsys, root: Path, args: list[str], *expected: str, also: tuple = ()) -> str:
    """`spectralds <args>` fails with one line holding every `expected` piece, and no file that existed
    under `root` (or in `also`) changes; returns the line."""
    before = sha256s(root, also)
    err = one_line_error(capsys, args)
    for piece in expected:
        assert piece in err, err
    after = sha256s(root, also)
    assert {k: after.get(k) for k in before} == before
    return err


class UserLM(L.LightningModule):
    """A user's own LightningModule (not one of ours) holding one STU layer, with the step interface
    `spectralds generate` decodes through: `seq_len`, `prefill`, `step`."""

    def __init__(self, dim: int = 16, seq_len: int = 32, num_filters: int = 4, vocab_size: int = 256):
        super().__init__()
        self.save_hyperparameters()
        self.seq_len = seq_len
        self.embed = torch.nn.Embedding(vocab_size, dim)
        self.mixer = build_layer("stu", dim=dim, seq_len=seq_len, num_filters=num_filters)
        self.head = torch.nn.Linear(dim, vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.mixer(self.embed(idx)))

    def prefill(self, idx: torch.Tensor):
        y, state = self.mixer.prefill(self.embed(idx))
        return self.head(y[:, -1]), state

    def step(self, token: torch.Tensor, state):
        y, state = self.mixer.step(self.embed(token), state)
        return self.head(y), state

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)
