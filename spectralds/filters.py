"""Spectral filters: top-K eigenvectors of the Hankel matrix Z, scaled by eigenvalue**0.25.

PLACEHOLDER (dense eigh only); the fast solver and disk cache land next.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

VARIANTS = ("hankel", "hankel_L")


def cache_dir() -> Path:
    """Where filters and LDS fits are cached: $SPECTRALDS_CACHE_DIR or ~/.cache/spectralds."""
    return Path(os.environ.get("SPECTRALDS_CACHE_DIR", Path.home() / ".cache" / "spectralds"))


def hankel_matrix(seq_len: int, variant: str = "hankel") -> torch.Tensor:
    s = torch.arange(2, 2 * seq_len + 1, dtype=torch.float64)  # i + j for i, j = 1..L
    if variant == "hankel":
        z = 2.0 / (s**3 - s)
    elif variant == "hankel_L":
        z = ((-1.0) ** (s - 2) + 1.0) * 8.0 / ((s + 3) * (s - 1) * (s + 1))
    else:
        raise ValueError(f"unknown filter variant {variant!r}; expected one of {VARIANTS}")
    i = torch.arange(seq_len)
    return z[i[:, None] + i[None, :]]


def spectral_filters(
    seq_len: int, num_filters: int, variant: str = "hankel", dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """(seq_len, num_filters): columns by descending eigenvalue, largest-|entry| positive."""
    evals, evecs = torch.linalg.eigh(hankel_matrix(seq_len, variant))
    evals, evecs = evals.flip(0)[:num_filters], evecs.flip(1)[:, :num_filters]
    idx = evecs.abs().argmax(dim=0)
    evecs = evecs * torch.sign(evecs[idx, torch.arange(num_filters)])
    return (evecs * evals.clamp_min(0) ** 0.25).to(dtype)
