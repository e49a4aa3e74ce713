"""The source's spectral filter bank, and how it maps onto ours.

An STU's weights only mean something with the filter bank it was trained with, and eigenvector signs
are arbitrary: flash-stu-2 builds its bank with numpy's eigh (ascending eigenvalues, LAPACK's signs) and
saves it as `phi`; the paper code builds it with torch's eigh on a GPU and saves nothing (its shipped
`spectral_filters.npy` differs in sign from CPU LAPACK on 6 of 24 columns). So the bank is read from
the source (or a file, or recomputed only when asked: `filters="eigh"`), and each of its columns is
matched to one of ours by measuring: source column j = s_j * our column perm[j]. When every column
matches to `MATCH_TOL` the weights are re-indexed onto our filters; otherwise the model carries the
source's bank (`store_filters=True`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from spectralds.errors import MissingFileError, UserError, first_line
from spectralds.filters import hankel_matrix, spectral_filters
from spectralds.interop.formats import SourceArch
from spectralds.interop.source import Source

# Largest column error, relative to the bank's largest column norm, still taken as "our filter": float32
# rounding is ~6e-8, solvers' tail disagreements (weighted by sigma^(1/4)) ~1e-8; bfloat16 is ~4e-3.
MATCH_TOL = 1e-6


@dataclass
class FilterMatch:
    bank: torch.Tensor  # the source's bank (seq_len, K), in its own order and dtype
    perm: torch.Tensor  # (K,) our column for each source column
    signs: torch.Tensor  # (K,) float64, +-1
    deviation: float  # max_j |S_j - s_j P_perm[j]| / max_i |P_i|
    origin: str  # where the bank came from

    @property
    def ours(self) -> bool:
        return self.deviation <= MATCH_TOL

    def describe(self) -> str:
        if self.ours:
            moved = int((self.perm != torch.arange(len(self.perm))).sum())
            flipped = int((self.signs < 0).sum())
            return (f"filters: ours up to order and sign ({moved} of {len(self.perm)} columns reordered, "
                    f"{flipped} flipped; max deviation {self.deviation:.1e}; bank from {self.origin})")
        return (f"filters: the source's bank carried in the checkpoint (store_filters=True): it differs "
                f"from ours up to order and sign by {self.deviation:.1e} > {MATCH_TOL:g} (bank from "
                f"{self.origin}, {str(self.bank.dtype).removeprefix('torch.')})")


def reference_eigh_bank(seq_len: int, k: int, hankel_L: bool, solver: str) -> torch.Tensor:
    """The bank as the references compute it: eigh of Z in float64, the top k in ascending order, times
    sigma^(1/4), with the signs the solver gives ("numpy": flash-stu-2; "torch": the paper code)."""
    z = hankel_matrix(seq_len, "hankel_L" if hankel_L else "hankel")
    if solver == "numpy":
        sigma, phi = (torch.from_numpy(a) for a in np.linalg.eigh(z.numpy()))
    else:
        sigma, phi = torch.linalg.eigh(z)
    return phi[:, -k:] * sigma[-k:].clamp_min(0) ** 0.25


def _read_bank(path: Path) -> torch.Tensor:
    if not path.is_file():
        raise MissingFileError(f"filter file {path} does not exist")
    try:
        if path.suffix == ".npy":
            return torch.from_numpy(np.load(path, allow_pickle=False))
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # numpy, safetensors and the unpickler raise many types for a bad file
        raise UserError(f"filter file {path} could not be read ({first_line(e)})") from e
    if isinstance(obj, dict):
        obj = obj.get("phi", next(iter(obj.values())) if len(obj) == 1 else None)
    if not isinstance(obj, torch.Tensor):
        raise UserError(f"filter file {path} holds no tensor (expected one array, or a dict with 'phi')")
    return obj


def source_bank(source: Source, arch: SourceArch, filters: str | os.PathLike) -> tuple[torch.Tensor, str]:
    """(bank, where it came from). filters: "auto" (the source's own: flash-stu-2's filter_path file when
    it is there, which its layers use, else its saved `phi` tensor), "eigh" (recomputed as the reference
    does) or a file (.npy, .pt, .safetensors)."""
    if str(filters) == "eigh":
        solver = "numpy" if arch.format == "flash-stu-2" else "torch"
        bank = reference_eigh_bank(arch.seq_len, arch.num_filters, arch.hankel_L, solver)
        return bank, f"{solver}.linalg.eigh on this machine"
    if str(filters) != "auto":
        bank, origin = _read_bank(Path(filters)), str(filters)
    elif arch.filter_path is not None and (_filter_file(source, arch).is_file() or "phi" not in source):
        path = _filter_file(source, arch)
        bank, origin = _read_bank(path), f"filter_path {path}"
        if "phi" in source:  # flash-stu-2's layers use the file's bank, whatever it saved as `phi`
            saved = source.get("phi").to(torch.float64)
            if saved.shape != bank.shape or not torch.equal(saved, bank.to(torch.float64)):
                origin += " (the saved 'phi' differs from it; flash-stu-2's layers use the file's bank)"
    elif "phi" in source:
        bank, origin = source.get("phi"), "the source's 'phi' tensor"
        if arch.filter_path is not None:
            origin += f" (its filter_path {arch.filter_path} is not there)"
    else:
        raise UserError("the source holds no filter bank (the paper code never saves one): pass --filters "
                        "FILE (the bank it ran with, e.g. SpectraLDS's models/spectral_filters.npy) or "
                        "--filters eigh (recomputed here; eigenvector signs may differ from the source's)")
    shape = (arch.seq_len, arch.num_filters)
    if bank.dim() != 2 or tuple(bank.shape) != shape or not bank.is_floating_point():
        raise UserError(f"the filter bank from {origin} has shape {tuple(bank.shape)} {bank.dtype}; the "
                        f"config needs floating (seq_len, num_eigh) = {shape}")
    if not bool(bank.isfinite().all()):
        raise UserError(f"the filter bank from {origin} holds NaN or Inf")
    return bank, origin


def _filter_file(source: Source, arch: SourceArch) -> Path:
    """The config's filter_path, read relative to the source when it is not a file from here."""
    path = Path(arch.filter_path)
    base = source.path if source.path.is_dir() else source.path.parent
    return path if path.is_absolute() or path.is_file() else base / path


def match_filters(bank: torch.Tensor, hankel_L: bool, origin: str) -> FilterMatch:
    """Pair each source column with the one of ours it correlates with most, measured (not assumed)."""
    seq_len, k = bank.shape
    ours = spectral_filters(seq_len, k, "hankel_L" if hankel_L else "hankel")
    src = bank.to(torch.float64)
    norms = ours.norm(dim=0)
    corr = (src.T @ ours) / (src.norm(dim=0)[:, None] * norms[None, :]).clamp_min(1e-300)
    perm = corr.abs().argmax(dim=1)
    signs = torch.where(corr.gather(1, perm[:, None])[:, 0] < 0, -1.0, 1.0).to(torch.float64)
    if len(set(perm.tolist())) != k:  # two source columns on one of ours: not our bank at all
        return FilterMatch(bank, torch.arange(k), torch.ones(k, dtype=torch.float64), float("inf"), origin)
    deviation = float((src - ours[:, perm] * signs).norm(dim=0).max() / norms.max())
    return FilterMatch(bank, perm, signs, deviation, origin)
