"""Run by tests/test_ddp.py with 2 CPU processes (gloo).

`ddp_worker.py OUT`: train, swap STU -> LDS mid-run, and keep training. Each rank writes checksums of
its weights right after the swap and at the end, so the test can check that every rank made the
identical swap and stayed in sync.

`ddp_worker.py cli CONFIG`: `spectralds fit --config CONFIG` (the callbacks below poison one rank's
batch and record every rank's weights after each step, for the non-finite-loss tests).
"""

import os
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from spectralds.callbacks import LayerAdaptiveStatePruning, STUToLDSDistillation
from spectralds.layers import build_layer


class Model(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(3, 8)
        self.mixers = torch.nn.ModuleList(
            [build_layer("stu", dim=8, seq_len=64, num_filters=4) for _ in range(2)]
        )
        self.decoder = torch.nn.Linear(8, 1)

    def forward(self, u):
        x = self.encoder(u)
        for mixer in self.mixers:
            x = x + mixer(x)
        return self.decoder(x)

    def training_step(self, batch, batch_idx):
        u, y = batch
        return torch.nn.functional.mse_loss(self(u), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def checksum_lines(module: torch.nn.Module) -> list[str]:
    items = module.state_dict().items()
    return [f"{name} {tuple(t.shape)} {t.double().sum().item():.17g}" for name, t in items]


class Checksums(L.Callback):
    def __init__(self, out: Path, at_step: int):
        self.out, self.at_step = out, at_step

    def _write(self, trainer, pl_module, tag):
        lines = checksum_lines(pl_module)
        (self.out / f"{tag}-rank{trainer.global_rank}.txt").write_text("\n".join(lines))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            self._write(trainer, pl_module, "swap")

    def on_train_end(self, trainer, pl_module):
        self._write(trainer, pl_module, "end")


class PoisonBatch(L.Callback):
    """Puts a NaN into the inputs of one rank's batch at one global step (the other ranks stay finite)."""

    def __init__(self, step: int, rank: int = 1):
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            batch[0][0, 0, 0] = float("nan")


class StepChecksums(L.Callback):
    """Writes `<out>/steps-rank<r>.txt`: the weights' checksums after every training batch."""

    def __init__(self, out: str):
        self.out, self.lines = Path(out), []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        weights = " ".join(line.rsplit(" ", 1)[1] for line in checksum_lines(pl_module))
        self.lines.append(f"step {trainer.global_step}: {weights}")

    def on_train_end(self, trainer, pl_module):
        (self.out / f"steps-rank{trainer.global_rank}.txt").write_text("\n".join(self.lines) + "\n")


def main(out: str) -> None:
    out_dir = Path(out)
    L.seed_everything(0)
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(32, 64, 3, generator=gen)
    data = DataLoader(TensorDataset(u, u.cumsum(1)[..., :1] / 8), batch_size=4)
    callbacks = [
        STUToLDSDistillation(at_step=2, validate=False, log_plot=False),
        LayerAdaptiveStatePruning(ratio=0.25, at_step=3, validate=False),
        Checksums(out_dir, at_step=3),
    ]
    trainer = L.Trainer(
        callbacks=callbacks,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out_dir),
    )
    trainer.fit(Model(), data)


if __name__ == "__main__":
    if sys.argv[1] == "cli":
        from spectralds.cli import main as cli_main

        code = 0
        try:
            cli_main(["fit", "--config", sys.argv[2]])
        except SystemExit as e:
            code = e.code
            raise
        finally:  # each rank's exit status, for the test (rank 1 is rank 0's child process)
            rank = os.environ.get("LOCAL_RANK", "0")
            (Path(sys.argv[2]).parent / f"exit-rank{rank}.txt").write_text(str(code))
    else:
        main(sys.argv[1])
