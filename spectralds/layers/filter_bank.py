"""The fixed filter bank `phi` of a convolutional layer (STU, STU-T): computed once per process, kept at
least float32, and either recomputed at load time (the default) or carried in the checkpoint.

store_filters=True makes `phi` a persistent buffer: saved in the state dict and, at load, replaced by
the saved bank (a model imported with its source's bank, or any custom bank, is used as is).
"""

from __future__ import annotations

import functools

import torch

from spectralds.errors import UserError, check_bool
from spectralds.filters import spectral_filters
from spectralds.io import cache_dir
from spectralds.layers.registry import SequenceLayer


def cached_filters(seq_len: int, num_filters: int, variant: str) -> torch.Tensor:
    # Keyed on the cache directory too: a process that switches SPECTRALDS_CACHE_DIR reads that cache.
    return _memo_filters(str(cache_dir()), seq_len, num_filters, variant)


@functools.lru_cache(maxsize=8)
def _memo_filters(directory: str, seq_len: int, num_filters: int, variant: str) -> torch.Tensor:
    # Every layer of a model asks for the same bank: compute (or load from disk) it once per process.
    return spectral_filters(seq_len, num_filters, variant).float()


def check_bank(name: str, bank: torch.Tensor, seq_len: int, num_filters: int) -> None:
    """A floating (seq_len, num_filters) tensor, or a one-line UserError."""
    if tuple(bank.shape) != (seq_len, num_filters) or not bank.is_floating_point():
        raise UserError(
            f"{name} must be a floating tensor of shape (seq_len, num_filters) = "
            f"{(seq_len, num_filters)}, got {tuple(bank.shape)} {bank.dtype}"
        )


class FilterBankLayer(SequenceLayer):
    """A layer with a filter bank buffer `phi` (seq_len, num_filters) and a derived-tensor cache
    `_spectra` (a `SpectrumCache`), emptied whenever phi may have changed."""

    seq_len: int
    num_filters: int

    def _register_bank(self, filters: torch.Tensor, store_filters: bool) -> None:
        self.store_filters = check_bool("store_filters", store_filters)
        # Fixed and recomputable, so not saved in checkpoints, unless the model carries its own bank.
        self.register_buffer("phi", filters.detach().float().clone(), persistent=store_filters)

    def _apply(self, fn, recurse=True):
        # `.half()` / `.bfloat16()` would round the filters; keep them at least float32.
        phi = self.phi
        super()._apply(fn, recurse)
        if self.phi.dtype not in (torch.float32, torch.float64):
            self.phi = phi.to(device=self.phi.device, dtype=torch.float32)
        self._spectra.clear()
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # A stored bank is copied into phi in place (which stays float32 at least); torch's own report of
        # a size mismatch takes several lines, so a wrong shape is refused here in one.
        if self.store_filters and prefix + "phi" in state_dict:
            check_bank(f"the stored filter bank {prefix}phi", state_dict[prefix + "phi"], self.seq_len,
                       self.num_filters)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        self._spectra.clear()
