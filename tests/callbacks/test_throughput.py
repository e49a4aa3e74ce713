"""TokenThroughput: reads the clock (a device synchronize on CUDA) once per logging interval, not per step,
and logs rates that match the tokens it saw."""

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from spectralds.callbacks import TokenThroughput
from spectralds.errors import UserError
from spectralds.models import LanguageModel


def _data(n: int, batch: int = 2, length: int = 16):
    x = torch.randint(0, 32, (n * batch, length + 1))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:, :-1], x[:, 1:]), batch_size=batch)


def test_clock_read_once_per_interval_and_rates_logged(tmp_path, monkeypatch):
    readings = []
    original = TokenThroughput._now
    monkeypatch.setattr(TokenThroughput, "_now", lambda self, tr: readings.append(1) or original(self, tr))
    model = LanguageModel(vocab_size=32, dim=16, num_layers=1, layer_pattern=["stu_t"], seq_len=16,
                          num_filters=4)
    meter = TokenThroughput(every=3)
    trainer = L.Trainer(max_steps=9, logger=CSVLogger(tmp_path), log_every_n_steps=1, accelerator="cpu",
                        callbacks=[meter], enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, _data(9))
    assert len(readings) == 1 + 1 + 3  # train start, the first batch, then steps 3, 6 and 9
    assert meter._logged["train/tokens_per_sec"] > 0
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "train/tokens_per_sec" in logged and "train/flops_per_sec" in logged


def test_every_must_be_a_positive_integer():
    with pytest.raises(UserError, match="every"):
        TokenThroughput(every=0)
