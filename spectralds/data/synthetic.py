"""The SpectraLDS synthetic task: regress the outputs of a random symmetric (diagonal) LDS.

    x_t = A x_{t-1} + B^T u_t,   y_t = C^T x_t (+ observation noise),   x_{-1} = 0,

with A = diag(a), max |a| = 1 - delta (long memory), B ~ N(0, 1)/d_in, C ~ N(0, 1)/state_dim and
Gaussian inputs u.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from scipy.fft import irfft, next_fast_len, rfft
from torch.utils.data import DataLoader, Dataset, TensorDataset

from spectralds.errors import UserError

from .windows import resumable_loader

# Entropy tags keeping the system, the training and the validation draws apart for one seed.
_TRAIN, _VAL = 1, 2


@dataclass(frozen=True)
class DiagonalLDS:
    """A diagonal LDS in float64: ``a`` (state_dim,), ``b`` (d_in, state_dim), ``c`` (state_dim, d_out)."""

    a: np.ndarray
    b: np.ndarray
    c: np.ndarray

    @classmethod
    def random(
        cls, state_dim: int, d_in: int, d_out: int, delta: float, rng: np.random.Generator
    ) -> DiagonalLDS:
        """A random system whose largest |eigenvalue| is exactly ``1 - delta``."""
        a = rng.standard_normal(state_dim)
        a *= (1.0 - delta) / np.abs(a).max()
        b = rng.standard_normal((d_in, state_dim)) / d_in
        c = rng.standard_normal((state_dim, d_out)) / state_dim
        return cls(a, b, c)

    def impulse_response(self, length: int) -> np.ndarray:
        """K_t = C^T diag(a^t) B^T for t < length, shape (length, d_out, d_in): y_t = sum_s K_s u_{t-s}."""
        powers = self.a[None, :] ** np.arange(length)[:, None]
        return np.einsum("so,ts,is->toi", self.c, powers, self.b)

    def outputs(self, u: np.ndarray) -> np.ndarray:
        """Outputs for inputs ``u`` (..., T, d_in), zero initial state, by FFT convolution in float64.

        Each state n is the causal convolution of (u @ B)[:, n] with a_n^t; cheaper than convolving with
        the full (T, d_out, d_in) impulse response when d_in * d_out exceeds state_dim.
        """
        u = np.asarray(u, dtype=np.float64)
        length = u.shape[-2]
        n = next_fast_len(2 * length - 1, real=True)
        drive = u @ self.b  # (..., T, state_dim)
        powers = self.a[None, :] ** np.arange(length)[:, None]  # (T, state_dim)
        states = irfft(rfft(drive, n, axis=-2) * rfft(powers, n, axis=0), n, axis=-2)[..., :length, :]
        return states @ self.c


class _LDSSequences(Dataset):
    """Sequence i is drawn from a generator seeded by (seed, tag, i): the same on every call and worker."""

    def __init__(self, system: DiagonalLDS, num: int, seq_len: int, noise: float, seed: int, tag: int):
        self.system, self.num, self.seq_len = system, num, seq_len
        self.noise, self.seed, self.tag = noise, seed, tag

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.num:
            raise IndexError(f"sequence {index} out of range for {self.num} sequences")
        rng = np.random.default_rng([self.seed, self.tag, index])
        u = rng.standard_normal((self.seq_len, self.system.b.shape[0]))
        y = self.system.outputs(u)
        if self.noise:
            y = y + self.noise * rng.standard_normal(y.shape)
        return torch.from_numpy(u).float(), torch.from_numpy(y).float()


class SyntheticLDSDataModule(L.LightningDataModule):
    """Batches ``(u, y)``: float32 ``(batch_size, seq_len, d_in)`` inputs and ``(..., d_out)`` LDS outputs.

    The system is drawn from ``seed`` at construction (see :attr:`system`). The ``num_train`` training
    sequences are generated on the fly, each from its own seed, so every epoch and every worker sees the
    same data; the ``num_val`` validation sequences are generated once, at length ``val_seq_len``
    (default ``seq_len``; set it longer to test length generalization). ``noise`` is the standard
    deviation of Gaussian noise added to the outputs of both splits.
    """

    def __init__(
        self,
        state_dim: int = 100,
        d_in: int = 16,
        d_out: int = 16,
        seq_len: int = 256,
        batch_size: int = 32,
        num_train: int = 4096,
        num_val: int = 256,
        noise: float = 0.0,
        delta: float = 0.001,
        seed: int = 0,
        val_seq_len: int | None = None,
        num_workers: int = 0,
    ):
        super().__init__()
        sizes = dict(state_dim=state_dim, d_in=d_in, d_out=d_out, seq_len=seq_len, batch_size=batch_size)
        sizes.update(num_train=num_train, num_val=num_val, val_seq_len=val_seq_len or 1)
        for name, value in sizes.items():
            if value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
        if not 0.0 < delta < 1.0:
            raise UserError(f"delta must be strictly between 0 and 1, got {delta}")
        if noise < 0:
            raise UserError(f"noise must be non-negative, got {noise}")
        if num_workers < 0:
            raise UserError(f"num_workers must be non-negative, got {num_workers}")
        # Not merged into the logger: the CLI logs the whole config, and model and data seq_len may differ.
        self.save_hyperparameters(logger=False)
        self.seq_len, self.val_seq_len = seq_len, val_seq_len or seq_len
        self.batch_size, self.num_train, self.num_val = batch_size, num_train, num_val
        self.noise, self.seed, self.num_workers = noise, seed, num_workers
        self.system = DiagonalLDS.random(state_dim, d_in, d_out, delta, np.random.default_rng([seed]))
        self.train_dataset: _LDSSequences | None = None
        self.val_dataset: TensorDataset | None = None

    @property
    def d_in(self) -> int:
        return self.system.b.shape[0]

    @property
    def d_out(self) -> int:
        return self.system.c.shape[1]

    def setup(self, stage: str | None = None) -> None:
        if self.val_dataset is not None:
            return
        system, noise, seed = self.system, self.noise, self.seed
        self.train_dataset = _LDSSequences(system, self.num_train, self.seq_len, noise, seed, _TRAIN)
        val = _LDSSequences(system, self.num_val, self.val_seq_len, noise, seed, _VAL)
        inputs, outputs = zip(*(val[i] for i in range(len(val))), strict=True)
        self.val_dataset = TensorDataset(torch.stack(inputs), torch.stack(outputs))

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        # The sequences are i.i.d. draws, so a fixed order loses nothing; resumable, so a run resumed
        # mid-epoch goes on where it stopped and matches an uninterrupted one.
        return resumable_loader(
            self.train_dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader:
        self._require_setup()
        return DataLoader(self.val_dataset, batch_size=self.batch_size, pin_memory=torch.cuda.is_available())

    def _require_setup(self) -> None:
        if self.val_dataset is None:
            raise RuntimeError("call setup() before asking SyntheticLDSDataModule for a dataloader")
