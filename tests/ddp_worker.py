"""Run by tests/test_ddp.py: 2 CPU processes (gloo) train, swap STU -> LDS mid-run, and keep training.

Each rank writes checksums of its weights right after the swap and at the end, so the test can
check that every rank made the identical swap and stayed in sync.
"""

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


class Checksums(L.Callback):
    def __init__(self, out: Path, at_step: int):
        self.out, self.at_step = out, at_step

    def _write(self, trainer, pl_module, tag):
        lines = [
            f"{name} {tuple(t.shape)} {t.double().sum().item():.17g}"
            for name, t in pl_module.state_dict().items()
        ]
        (self.out / f"{tag}-rank{trainer.global_rank}.txt").write_text("\n".join(lines))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            self._write(trainer, pl_module, "swap")

    def on_train_end(self, trainer, pl_module):
        self._write(trainer, pl_module, "end")


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
    main(sys.argv[1])
