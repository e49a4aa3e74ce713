"""Spectral filters: top eigenvectors of a Hankel matrix Z, scaled by eigenvalue**0.25.

Variants (``VARIANTS``), with s = i + j for i, j = 1..L:

* ``"hankel"``: Z_ij = 2 / (s^3 - s), the moment matrix of (1 - x)^2 on [0, 1] (Flash STU).
* ``"hankel_L"``: Z_ij = ((-1)^(s-2) + 1) * 8 / ((s + 3)(s - 1)(s + 1)), Flash STU's "Hankel-L".
* ``"tensor"``: products of two short filter banks (arXiv 2411.01035). With t = t2 * L1 + t1,
  ``filter[t] = phi^(L1)_i[t1] * phi^(L2)_j[t2]``, i.e. ``torch.kron(phi^(L2)_j, phi^(L1)_i)``: the
  L1 factor is the fine scale (it varies fastest), matching mu_a^(L1 L2) = kron(mu_(a^L1)^(L2), mu_a^(L1))
  for mu_a^(L) = (1, a, ..., a^(L-1)). ``tensor_filters(l1, l2, k1, k2, num_filters)`` returns the k1 * k2
  products ranked by weight (sigma^(L1)_i sigma^(L2)_j)^(1/4), descending; ties keep the column order of
  ``torch.kron(Phi2, Phi1)`` (column j * k1 + i). ``spectral_filters(L, K, "tensor")`` takes
  L1 = the smallest power of two >= ceil(sqrt(L)), L2 = ceil(L / L1), the top K products, truncated to L.

Every filter bank is (seq_len, num_filters), columns by descending eigenvalue (weight), each column with
its largest-magnitude entry positive (eigenvector signs are otherwise arbitrary).

Methods: ``"eigh"`` is dense float64 ``torch.linalg.eigh``, O(L^3), the reference. ``"lanczos"`` is
Lanczos with full reorthogonalization and an FFT Hankel mat-vec, O(L log L) per step, all float64; it
converges in about K + 5 steps. ``"auto"`` uses eigh up to L = 512 and Lanczos above.

Accuracy: Z's eigenvalues decay geometrically ("hankel", L = 8192: sigma_24 ~ 1e-12 sigma_1), and float64
pins an eigenvector down only to roughly eps * sigma_1 / gap, so the last "hankel" filters differ between
correct float64 solvers: eigh of Z and of the reversed matrix J Z J disagree by up to ~1e-10 relative
MSE per filter at L = 4096, K = 24. Against an 80-bit reference Lanczos is several times closer than
eigh, so "lanczos vs eigh" per-filter errors in the tail measure eigh's rounding. Filters with
sigma_k < ``RESOLUTION`` * sigma_1 are not determined by float64 at all (solvers disagree by 1e-6 up to
100%): ``"eigh"`` still returns them (orthonormal, arbitrary within that noise), ``"lanczos"`` raises a
ValueError, and ``"auto"`` then falls back to eigh up to L = 4096 and raises above.

Results are cached as float64 safetensors in ``spectralds.io.cache_dir()`` keyed by (variant, L, K,
method, version). A cached file carries what it was computed for and a content hash (``io.tensor_hash``)
in its metadata; a file that is unreadable, computed for another request, or fails its hash (a flipped
byte, an edited value), and an old file without a hash, is recomputed with a warning naming it. Writes
go through ``io.write_cache``: atomic, and a cache that cannot be written warns once and the run goes on.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import scipy.fft
import scipy.linalg
import torch
from safetensors.torch import load, save

from spectralds.errors import UserError, UserTypeError, check_choice, check_int
from spectralds.io import cache_dir, tensor_hash, write_cache

VARIANTS = ("hankel", "hankel_L", "tensor")
EIGEN_SOLVERS = ("auto", "eigh", "lanczos")
RESOLUTION = 1e-13  # Lanczos refuses filters with sigma_k / sigma_1 below this: float64 cannot fix them
_EIGH_MAX_LEN, _EIGH_FALLBACK_MAX_LEN = 512, 4096
# Bounds checked before anything is allocated, so that a mistyped size (--seq-len 99999999999, a file
# claiming one) is a one-line refusal, not a memory or time blow-up: 128x the reference models' 8192,
# and 2 GiB of float64 for the largest array a filter bank or a fit of it holds.
MAX_SEQ_LEN = 2**20
MAX_ELEMENTS = 2**28
_CACHE_VERSION = 2  # 2: files carry their request and a content hash (v1 files are not read)
_EPS = torch.finfo(torch.float64).eps


def _hankel_entries(seq_len: int, variant: str) -> torch.Tensor:
    """z[m] = Z_ij for i + j - 2 = m, m = 0..2L-2 (a Hankel matrix is fixed by its anti-diagonals)."""
    s = torch.arange(2, 2 * seq_len + 1, dtype=torch.float64)
    if variant == "hankel":
        return 2.0 / ((s - 1) * s * (s + 1))
    if variant == "hankel_L":
        return (1.0 + (-1.0) ** s) * 8.0 / ((s + 3) * (s - 1) * (s + 1))
    raise UserError(f"unknown Hankel variant {variant!r}; expected 'hankel' or 'hankel_L'")


def hankel_matrix(seq_len: int, variant: str = "hankel") -> torch.Tensor:
    """Dense float64 Z of shape (seq_len, seq_len), for references and tests."""
    i = torch.arange(seq_len)
    return _hankel_entries(seq_len, variant)[i[:, None] + i[None, :]]


def _eigh(seq_len: int, k: int, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    evals, evecs = torch.linalg.eigh(hankel_matrix(seq_len, variant))
    return evals.flip(0)[:k], evecs.flip(1)[:, :k]


def _lanczos(seq_len: int, k: int, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs by Lanczos with full (twice-applied) reorthogonalization.

    numpy/scipy here: pocketfft and LAPACK's tridiagonal solver carry far less per-call overhead than
    torch for the many small operations of one Lanczos step.
    """
    # (Zv)_i = sum_j z[i+j] v_j is a correlation: FFT of size >= 2L-1 (no wrap-around in the kept rows).
    # FFT rounding is uniform, ~eps * max|z| * |v| in every row, which would swamp Z v for the tail
    # eigenvectors (they sit near the top-left corner with sigma ~ 1e-12). So the large entries z[m],
    # m < 64, go through a small dense product and the FFT only sees entries below 2e-5 * z[0]. (64 was
    # measured best against an 80-bit reference: 1000x better tail filters than a plain FFT mat-vec.)
    z = _hankel_entries(seq_len, variant).numpy()
    near = min(seq_len, 64)
    idx = np.add.outer(np.arange(near), np.arange(near))
    z_near = np.where(idx < near, z[idx], 0.0)
    n_fft = scipy.fft.next_fast_len(2 * seq_len - 1, real=True)
    z_far_hat = scipy.fft.rfft(np.concatenate([np.zeros(near), z[near:]]), n_fft)

    def matvec(v: np.ndarray) -> np.ndarray:
        y = scipy.fft.irfft(z_far_hat * scipy.fft.rfft(v[::-1], n_fft), n_fft)[seq_len - 1 : 2 * seq_len - 1]
        y[:near] += z_near @ v[:near]
        return y

    rng = np.random.default_rng(0)  # fixed start vector: deterministic output
    max_dim = min(seq_len, 2 * k + 100)
    basis, z_basis = np.empty((max_dim, seq_len)), np.empty((max_dim, seq_len))  # q_m and Z q_m
    alpha, beta = np.zeros(max_dim), np.zeros(max_dim)
    w, converged = rng.standard_normal(seq_len), False
    for m in range(1, max_dim + 1):
        basis[m - 1] = w / np.linalg.norm(w)
        w = matvec(basis[m - 1])
        z_basis[m - 1] = w  # a copy: w is orthogonalized in place below
        alpha[m - 1] = basis[m - 1] @ w
        for _ in range(2):  # "twice is enough" keeps the basis orthonormal to rounding
            w -= basis[:m].T @ (basis[:m] @ w)
        beta[m - 1] = np.linalg.norm(w)
        # Bisection + inverse iteration (stebz) keeps the tiny Ritz values' vectors to high relative
        # accuracy on this graded T; the default driver loses them (1e-6 errors in the last filters).
        theta, s = scipy.linalg.eigh_tridiagonal(
            alpha[:m], beta[: m - 1], select="i", select_range=(max(0, m - k), m - 1), lapack_driver="stebz"
        )
        # Ritz residuals ||Z x - theta x|| = beta_m |s_m| of the top k. A vector's error is residual / gap
        # and the last gaps are ~1e-12 * sigma_1, so the residuals go well below eps * sigma_1.
        residual = beta[m - 1] * np.abs(s[-1, -k:]).max()
        converged = m >= k and (m == seq_len or residual <= 1e-3 * _EPS * theta[-1])
        if converged or m == max_dim:  # (a random start meets no invariant subspace before m = L)
            break
    s = s[:, ::-1].copy()
    ritz, z_ritz = basis[:m].T @ s, z_basis[:m].T @ s
    # Rayleigh quotients from the stored Z q_m: the tail Ritz values of T carry ~1e-5 relative error
    theta = (ritz * z_ritz).sum(0) / (ritz * ritz).sum(0)
    if theta[-1] < RESOLUTION * theta[0]:
        n_ok = int((theta >= RESOLUTION * theta[0]).sum())
        raise UserError(
            f"only {n_ok} of {k} {variant} filters are resolvable in float64 at seq_len={seq_len}; "
            "ask for fewer filters or use method='eigh'"
        )
    if not converged:
        raise RuntimeError(f"Lanczos did not converge in {max_dim} steps (seq_len={seq_len}, k={k})")
    return torch.from_numpy(theta), torch.from_numpy(ritz)


def check_size(what: str, elements: int) -> None:
    """Refuse work whose largest float64 array would hold more than `MAX_ELEMENTS` values."""
    if elements > MAX_ELEMENTS:
        raise UserError(f"{what} needs an array of {elements:,} float64 values ({elements * 8 / 2**30:,.1f} "
                        f"GiB), above the bound of {MAX_ELEMENTS:,} ({MAX_ELEMENTS * 8 / 2**30:g} GiB)")


def _validate(
    seq_len: int, num_filters: int, variant: str, method: str, names: tuple = ("seq_len", "num_filters")
) -> None:
    check_int(names[0], seq_len, maximum=MAX_SEQ_LEN)
    check_int(names[1], num_filters, maximum=seq_len)
    # The Lanczos basis and its images: 2 x (steps <= 2K + 100) x L (eigh's L x L below 4096 is smaller)
    check_size(f"{num_filters} spectral filters of length {seq_len}",
               2 * min(seq_len, 2 * num_filters + 100) * seq_len)
    check_choice("filter variant", variant, VARIANTS)
    check_choice("filter method", method, EIGEN_SOLVERS)


def _eigenpairs(seq_len: int, k: int, variant: str, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (eigenvalues descending, eigenvectors with canonical sign) of Z."""
    if method == "eigh" or (method == "auto" and seq_len <= _EIGH_MAX_LEN):
        evals, evecs = _eigh(seq_len, k, variant)
    else:
        try:
            evals, evecs = _lanczos(seq_len, k, variant)
        except ValueError:
            if method == "lanczos" or seq_len > _EIGH_FALLBACK_MAX_LEN:
                raise
            evals, evecs = _eigh(seq_len, k, variant)
    return evals, _canonical_sign(evecs)


def _canonical_sign(x: torch.Tensor) -> torch.Tensor:
    """Flip columns so that each column's entry of largest magnitude is positive."""
    peak = x.gather(0, x.abs().argmax(dim=0, keepdim=True))
    return x * torch.where(peak < 0, -1.0, 1.0).to(x.dtype)


def hankel_eigenvalues(
    seq_len: int, num_filters: int, variant: str = "hankel", method: str = "auto"
) -> torch.Tensor:
    """The top num_filters eigenvalues of Z (float64, descending)."""
    _validate(seq_len, num_filters, variant, method)
    return _eigenpairs(seq_len, num_filters, variant, method)[0]


def _hankel_filters(seq_len: int, k: int, variant: str, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights sigma^(1/4), filters) for a Hankel variant; tiny negative rounding noise counts as 0."""
    evals, evecs = _eigenpairs(seq_len, k, variant, method)
    weights = evals.clamp_min(0) ** 0.25
    return weights, evecs * weights


def tensor_filters(
    l1: int, l2: int, k1: int, k2: int, num_filters: int | None = None, method: str = "auto"
) -> torch.Tensor:
    """Tensor filters (l1 * l2, n): kron(phi^(l2)_j, phi^(l1)_i) ranked by weight (see module doc).

    Returns all k1 * k2 products, or the top ``num_filters`` of them; float64, canonical signs.
    """
    _validate(l1, k1, "hankel", method, ("l1", "k1"))
    _validate(l2, k2, "hankel", method, ("l2", "k2"))
    if num_filters is not None and not 1 <= num_filters <= k1 * k2:
        raise UserError(f"num_filters must be between 1 and k1 * k2 = {k1 * k2}, got {num_filters}")
    w1, fine = _hankel_filters(l1, k1, "hankel", method)
    w2, coarse = _hankel_filters(l2, k2, "hankel", method)
    order = torch.sort(torch.kron(w2, w1), descending=True, stable=True).indices[:num_filters]
    j, i = order // k1, order % k1  # column j * k1 + i of torch.kron(coarse, fine)
    return (coarse[:, None, j] * fine[None, :, i]).reshape(l1 * l2, -1)


def _tensor_shape(seq_len: int) -> tuple[int, int]:
    l1 = 1 << math.isqrt(seq_len - 1).bit_length()  # smallest power of two >= ceil(sqrt(seq_len))
    return l1, -(-seq_len // l1)


def _compute(seq_len: int, num_filters: int, variant: str, method: str) -> torch.Tensor:
    if variant != "tensor":
        return _hankel_filters(seq_len, num_filters, variant, method)[1]
    l1, l2 = _tensor_shape(seq_len)
    bank = tensor_filters(l1, l2, min(num_filters, l1), min(num_filters, l2), num_filters, method)
    return _canonical_sign(bank[:seq_len])  # truncation can cut a column's peak


def _cache_path(seq_len: int, num_filters: int, variant: str, method: str) -> Path:
    return cache_dir() / f"filters_{variant}_L{seq_len}_K{num_filters}_{method}_v{_CACHE_VERSION}.safetensors"


def _cache_fields(seq_len: int, num_filters: int, variant: str, method: str) -> dict[str, str]:
    """What a cached bank was computed for: stored in its metadata and checked on every load."""
    return {"seq_len": str(seq_len), "num_filters": str(num_filters), "variant": variant, "method": method,
            "version": str(_CACHE_VERSION)}


def _load(path: Path, fields: dict[str, str]) -> torch.Tensor | None:
    """The cached bank at `path` if it is exactly what `fields` asks for and passes its hash, else None
    (with a warning naming the file when one exists: it is recomputed)."""
    if not path.exists():
        return None
    try:
        blob = path.read_bytes()  # a copy, not an mmap a later rewrite could truncate
        filters = load(blob)["filters"]
        size = int.from_bytes(blob[:8], "little")  # safetensors: u64 header size, then the JSON header
        meta = json.loads(blob[8 : 8 + size]).get("__metadata__") or {}
        shape = (int(fields["seq_len"]), int(fields["num_filters"]))
        wrong = [k for k in fields if meta.get(k) != fields[k]]
        if "sha256" not in meta:
            problem = "no content hash (written by an older version)"
        elif wrong:
            problem = ", ".join(f"{k}={meta.get(k)!r} instead of {fields[k]!r}" for k in wrong)
        elif meta["sha256"] != tensor_hash({"filters": filters}, **fields):
            problem = "content hash mismatch: the file was altered or corrupted"
        elif filters.shape != shape or filters.dtype != torch.float64 or not bool(filters.isfinite().all()):
            problem = f"shape {tuple(filters.shape)}, dtype {filters.dtype}"
        else:
            return filters
    except Exception as err:  # safetensors reports corruption with several exception types
        problem = " ".join(str(err).split()) or type(err).__name__
    warnings.warn(f"ignoring filter cache {path} ({problem}); recomputing", stacklevel=3)
    return None


def _save(path: Path, filters: torch.Tensor, fields: dict[str, str]) -> None:
    filters = filters.contiguous()
    meta = {**fields, "sha256": tensor_hash({"filters": filters}, **fields)}
    write_cache(path, save({"filters": filters}, metadata=meta))  # optional: warns once if it fails


def spectral_filters(
    seq_len: int,
    num_filters: int,
    variant: str = "hankel",
    dtype: torch.dtype = torch.float64,
    method: str = "auto",
    use_cache: bool = True,
) -> torch.Tensor:
    """Spectral filters (seq_len, num_filters): eigenvectors of Z times eigenvalue**0.25.

    Columns by descending eigenvalue, largest-magnitude entry positive; computed in float64 and cast to
    ``dtype``. See the module docstring for variants, methods, accuracy limits and the cache.
    """
    _validate(seq_len, num_filters, variant, method)
    if not dtype.is_floating_point:
        raise UserTypeError(f"dtype must be a floating point dtype, got {dtype}")
    path, fields = _cache_path(seq_len, num_filters, variant, method), _cache_fields(
        seq_len, num_filters, variant, method)
    filters = _load(path, fields) if use_cache else None
    if filters is None:
        filters = _compute(seq_len, num_filters, variant, method)
        if use_cache:
            _save(path, filters, fields)
    return filters.to(dtype)
