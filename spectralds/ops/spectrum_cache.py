"""A per-layer cache of tensors derived from fixed source tensors (filter spectra, LDS kernels).

What the STU's filter bank and a fitted (non-learnable) LDS share: an FFT of something no optimizer
changes, needed once per FFT length. Entries are emptied when a source is replaced (a new object, e.g.
after `.to()` or `set_system`) or edited in place (its version counter). Inference-mode tensors cannot
be saved for backward, so entries built under inference mode are kept apart from the ones a training
step may use. The cache is a plain attribute, never part of a state_dict.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence

import torch


def _stamp(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    # Inference tensors have no version counter; one made under inference_mode counts as version 0.
    return t, 0 if t.is_inference() else t._version


class SpectrumCache:
    """Up to `capacity` derived tensors keyed by the caller (e.g. lags and FFT length), built without grad."""

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._entries: dict[tuple, torch.Tensor] = {}
        self._sources: tuple[tuple[torch.Tensor, int], ...] = ()

    # Version counters and inference flags cannot be traced: under torch.compile the lookup runs eager
    # (one graph break) and its result enters the compiled graph as an input.
    @torch.compiler.disable
    def get(
        self, sources: Sequence[torch.Tensor], key: Hashable, build: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """The entry for `key`, built by `build()` (under no_grad) unless cached for these very sources."""
        stamps = tuple(_stamp(t) for t in sources)
        old = self._sources
        changed = len(old) != len(stamps) or any(
            a is not b or va != vb for (a, va), (b, vb) in zip(old, stamps, strict=True)
        )
        if changed:
            self._entries.clear()
            self._sources = stamps
        full_key = (key, torch.is_inference_mode_enabled())
        entry = self._entries.get(full_key)
        if entry is None:
            with torch.no_grad():
                entry = build()
            if len(self._entries) >= self.capacity:
                self._entries.pop(next(iter(self._entries)))  # oldest first
            self._entries[full_key] = entry
        return entry

    def clear(self) -> None:
        self._entries.clear()
        self._sources = ()

    def values(self) -> Iterator[torch.Tensor]:
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)
