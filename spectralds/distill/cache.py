"""The on-disk cache of LDS fits: `get_fit` returns a verified cached fit or computes and stores one.

A cache file is trusted only when it is exactly what was asked for: its metadata must name the same
seq_len, num_filters, state_dim, variant, method and solver revision, and its content hash
(`spectralds.io.tensor_hash` over the tensors and the metadata) must match. Anything else (an unreadable
file, another request's fit copied over the name, one flipped byte or sign, a file from before hashes
existed) is recomputed with a warning naming the file, and the good fit is written over it.
Writes go through `spectralds.io.write_cache`: a cache that cannot be written warns once, and the
computed fit is returned all the same.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from spectralds.distill import fit as fit_module  # by module: tests patch fit_module.fit_filters
from spectralds.distill.lds_file import VERSION, LDSFit, fit_bytes, read_fit
from spectralds.errors import UserError, first_line
from spectralds.io import cache_dir, write_cache

__all__ = ["fit_cache_path", "get_fit"]


def _revision() -> str:
    return f"v{VERSION}r{fit_module.SOLVER_REVISION}"


def fit_cache_path(seq_len: int, num_filters: int, state_dim: int, variant: str, method: str) -> Path:
    """Where `get_fit` keeps the fit for these arguments (in `spectralds.io.cache_dir()`)."""
    name = f"lds_{variant}_L{seq_len}_K{num_filters}_h{state_dim}_{method}_{_revision()}.safetensors"
    return cache_dir() / name


def _cached(path: Path, asked: dict[str, str]) -> LDSFit | None:
    """The fit at `path` if it is exactly what `asked` describes and passes its hash, else None."""
    if not path.exists():
        return None
    try:
        fit, meta, status = read_fit(path)
    except UserError as err:
        problem = first_line(err)
    else:
        wrong = [f"{k}={meta.get(k)!r} instead of {v!r}" for k, v in asked.items() if meta.get(k) != v]
        if wrong:
            problem = "it holds another fit: " + ", ".join(wrong)
        elif status != "ok":
            problem = {"missing": "it has no content hash (an older file)",
                       "mismatch": "it fails its content hash (altered or corrupted)"}[status]
        else:
            return fit
    warnings.warn(f"recomputing the cached LDS fit {path}: {problem}", stacklevel=3)
    return None


def get_fit(
    seq_len: int,
    num_filters: int,
    state_dim: int,
    variant: str = "hankel",
    method: str = "varpro",
    progress: bool = True,
) -> LDSFit:
    """The fit from the cache in `spectralds.io.cache_dir()`, verified (see the module doc), or
    computed by `fit_filters` and stored when absent or not trustworthy."""
    fit_module.check_fit_args(seq_len, num_filters, state_dim, method)
    path = fit_cache_path(seq_len, num_filters, state_dim, variant, method)
    asked = {"seq_len": str(seq_len), "num_filters": str(num_filters), "state_dim": str(state_dim),
             "variant": variant, "method": method, "solver_revision": _revision()}
    fit = _cached(path, asked)
    if fit is None:
        fit = fit_module.fit_filters(seq_len, num_filters, state_dim, variant, method, progress)
        write_cache(path, fit_bytes(fit, {"solver_revision": asked["solver_revision"]}))
    return fit
