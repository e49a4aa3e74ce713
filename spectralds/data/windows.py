"""Windows of ``seq_len + 1`` tokens cut from a token stream, as ``(x, y)`` pairs with ``y = x`` shifted."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from spectralds.errors import UserError


def _pair(window: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.from_numpy(np.asarray(window, dtype=np.int64))
    return tokens[:-1], tokens[1:]


class TokenWindows(Dataset):
    """Map-style dataset over a flat token array, indexed by the window's first token offset.

    Pair it with :class:`WindowSampler`, which chooses the offsets. The array can be a memmap that is
    reopened in each worker process (``open_tokens`` is called lazily), so it is never pickled.
    """

    def __init__(self, open_tokens: Callable[[], np.ndarray], seq_len: int):
        self.open_tokens = open_tokens
        self.seq_len = seq_len
        self._tokens: np.ndarray | None = None

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = self.open_tokens()
        return self._tokens

    def __len__(self) -> int:
        return max(0, len(self.tokens) - self.seq_len)  # the number of valid start offsets

    def __getitem__(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.tokens[start : start + self.seq_len + 1]
        if len(window) != self.seq_len + 1:
            raise IndexError(f"window at {start} runs past the end of {len(self.tokens)} tokens")
        return _pair(window)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}


class WindowSampler(Sampler[int]):
    """Start offsets of non-overlapping ``seq_len + 1``-token windows over ``num_tokens`` tokens.

    Without shuffling the windows sit on the grid ``0, seq_len, 2*seq_len, ...``. With shuffling, each
    epoch moves the whole grid by a random shift below ``seq_len`` and visits its windows in a random
    order; both are drawn from ``(seed, epoch)`` only, so a resumed run replays the same epoch. Lightning
    calls :meth:`set_epoch` (also through its DDP wrapper, which then splits the offsets by rank).
    """

    def __init__(self, num_tokens: int, seq_len: int, shuffle: bool = False, seed: int = 0):
        if num_tokens < seq_len + 1:
            raise UserError(f"{num_tokens} tokens are fewer than one window of seq_len + 1 = {seq_len + 1}")
        self.seq_len, self.shuffle, self.seed, self.epoch = seq_len, shuffle, seed, 0
        if shuffle:
            # Keep one window of room for the shift (unless the stream is too short to spare one).
            self.num_windows = max(1, num_tokens // seq_len - 1)
        else:
            self.num_windows = (num_tokens - 1) // seq_len
        self.max_shift = min(seq_len - 1, num_tokens - 1 - self.num_windows * seq_len) if shuffle else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_windows

    def offsets(self, epoch: int) -> list[int]:
        """The window start offsets of `epoch`, in the order visited."""
        if not self.shuffle:
            return list(range(0, self.num_windows * self.seq_len, self.seq_len))
        rng = np.random.default_rng([self.seed, epoch])
        shift = int(rng.integers(self.max_shift + 1))
        return (shift + rng.permutation(self.num_windows) * self.seq_len).tolist()

    def __iter__(self) -> Iterator[int]:
        return _WindowPass(self)


class _WindowPass(Iterator[int]):
    """One pass of a :class:`WindowSampler`, whose state (epoch, offsets handed out) a StatefulDataLoader
    saves and restores, so a resumed pass replays its own epoch from where it stopped.

    The epoch is read at the first offset, not when the pass is created: Lightning creates the train
    loader's iterator before it calls ``set_epoch``, and restores a saved pass before that too.
    """

    def __init__(self, sampler: WindowSampler):
        self.sampler, self.epoch, self.yielded = sampler, None, 0
        self._offsets: list[int] | None = None

    def __next__(self) -> int:
        if self._offsets is None:
            self.epoch = self.sampler.epoch if self.epoch is None else self.epoch
            self._offsets = self.sampler.offsets(self.epoch)
        if self.yielded >= len(self._offsets):
            raise StopIteration
        self.yielded += 1
        return self._offsets[self.yielded - 1]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch if self.epoch is None else self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.yielded, self._offsets = int(state["epoch"]), int(state["yielded"]), None


class PackedWindows(IterableDataset):
    """Windows packed on the fly from a stream of token-id lists (for streaming datasets).

    ``token_lists`` is a callable returning a fresh iterable each time (called inside each worker;
    any splitting across workers or ranks is its job). Consecutive windows share one token, as in the
    map-style case, and a buffer of ``shuffle_windows`` windows mixes their order with a generator seeded
    by ``(seed, worker id, pass)``. With ``repeat`` the stream starts over when it ends, so the
    iteration never stops (unless a pass yields no window at all).
    """

    def __init__(
        self,
        token_lists: Callable[[], Iterable[list[int]]],
        seq_len: int,
        seed: int = 0,
        shuffle_windows: int = 256,
        repeat: bool = False,
    ):
        self.token_lists, self.seq_len = token_lists, seq_len
        self.seed, self.shuffle_windows, self.repeat = seed, shuffle_windows, repeat

    def _windows(self) -> Iterator[np.ndarray]:
        carry = np.empty(0, dtype=np.int64)
        for ids in self.token_lists():
            tokens = np.concatenate([carry, np.asarray(ids, dtype=np.int64)])
            count = max(0, (len(tokens) - 1) // self.seq_len)
            for i in range(count):
                yield tokens[i * self.seq_len : (i + 1) * self.seq_len + 1].copy()
            carry = tokens[count * self.seq_len :]

    def _shuffled(self, rng: np.random.Generator) -> Iterator[np.ndarray]:
        buffer: list[np.ndarray] = []
        for window in self._windows():
            if len(buffer) < self.shuffle_windows:
                buffer.append(window)
                continue
            i = int(rng.integers(len(buffer)))
            buffer[i], window = window, buffer[i]
            yield window
        for i in rng.permutation(len(buffer)):
            yield buffer[i]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker = get_worker_info()
        for pass_index in itertools.count():
            rng = np.random.default_rng([self.seed, worker.id if worker else 0, pass_index])
            produced = False
            for window in self._shuffled(rng):
                produced = True
                yield _pair(window)
            if not (self.repeat and produced):
                return


def resumable_loader(dataset: Dataset, **kwargs: Any) -> StatefulDataLoader:
    """A DataLoader that Lightning resumes mid-epoch (map-style datasets): torchdata's StatefulDataLoader.

    Lightning saves a train loader's ``state_dict()`` in each checkpoint and loads it on resume; the
    StatefulDataLoader then skips the batches of indices already handed out in that pass, without
    loading them. With a sampler that replays an epoch from ``(seed, epoch)`` (:class:`WindowSampler`),
    or a fixed order, a run killed mid-epoch and resumed sees exactly the batches of an uninterrupted
    run (a plain DataLoader would start the epoch over).
    """
    return StatefulDataLoader(dataset, **kwargs)
