"""The fitted LDS as data (`LDSFit`) and as a file (safetensors, no pickle).

File layout: float64 tensors ``A`` (h,), ``B`` (h,), ``C`` (h, 2K) and string metadata: ``format``,
``version``, ``seq_len``, ``num_filters``, ``variant``, ``method``, ``state_dim``, the errors (floats
written with ``repr``, per-filter errors as JSON lists), ``cancellation``, ``float32_check`` (how the
float32 errors were measured) and ``sha256``, the content hash (`spectralds.io.tensor_hash`) of the
tensors and every other metadata entry. The bytes are written here rather than by
``safetensors.torch.save``, which orders metadata keys at random: one fit gives one file, byte for byte.
Any safetensors reader opens it.

Loading checks the hash last (after the structure, so a malformed file gets the precise message): a
mismatch (a flipped byte, an edited entry) is a one-line error naming the file. A file without a hash
(written before hashes existed) is loaded with a warning that it is unverified; the fit cache
(`spectralds.distill.cache`) recomputes such files instead.
"""

from __future__ import annotations

import json
import math
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from spectralds.distill.measure import cancellation_factor, float32_check, relative_mse, target_filters
from spectralds.errors import UserError, check_float
from spectralds.filters import MAX_SEQ_LEN, check_size, spectral_filters
from spectralds.io import atomic_write, input_file, tensor_hash
from spectralds.ops.lds_conv import impulse_response_ref

FORMAT = "spectralds-lds"
VERSION = 1
FLOAT32_WARN_LEVEL = 1e-6  # load_fit warns when the predicted float32 relative MSE is above this
# load_fit(expect_filters=...) refuses a fit whose impulse response is further than this (relative MSE)
# from the filters it will serve: loose enough for the published 160-state fit (2.5e-6), while a fit
# with its columns in another order measures ~2.
FILTER_ERROR_LIMIT = 1e-4
HASH_KEY = "sha256"
_EPS32 = torch.finfo(torch.float32).eps


@dataclass
class LDSFit:
    """A diagonal real LDS whose impulse response reproduces 2K spectral filters.

    ``sum_j C[j, k] * B[j] * A[j] ** t`` approximates filter k for t = 0..seq_len-1: columns 0..K-1 are
    the filters phi_k, columns K..2K-1 are (-1)^t phi_k. Errors are relative MSEs,
    ``sum (response - target)^2 / sum target^2``: ``rel_mse_f64`` of the float64 impulse response,
    ``rel_mse_f32`` of a plain float32 recurrence driven by a fixed-seed Gaussian input of length
    seq_len against the float64 convolution of that input with the filters (see
    `spectralds.distill.fit.float32_check`). ``cancellation`` is max_k sum_j |B_j C_jk| / max_t |phi_k(t)|.
    """

    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    seq_len: int
    num_filters: int
    variant: str
    method: str
    rel_mse_f64: float = math.nan
    rel_mse_f64_per_filter: list[float] = field(default_factory=list)
    rel_mse_f32: float = math.nan
    rel_mse_f32_per_filter: list[float] = field(default_factory=list)
    cancellation: float = math.nan
    version: int = VERSION

    @property
    def state_dim(self) -> int:
        return self.A.shape[0]


def measured_fit(
    A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, targets: torch.Tensor, variant: str, method: str,
    float32: tuple[float, list[float]] | None = None,
) -> LDSFit:
    """An LDSFit of (A, B, C) whose errors are measured here against `targets` (seq_len, 2K), the
    float32 check included unless the caller already ran it (`float32`: its (error, per filter))."""
    A, B, C = (t.detach().to("cpu", torch.float64).contiguous() for t in (A, B, C))
    seq_len, width = targets.shape
    response = impulse_response_ref(A, B, C, seq_len)
    f32, f32_per_filter = float32 if float32 is not None else float32_check(A, B, C, targets)
    return LDSFit(
        A=A, B=B, C=C, seq_len=seq_len, num_filters=width // 2, variant=variant, method=method,
        rel_mse_f64=relative_mse(response, targets),
        rel_mse_f64_per_filter=relative_mse(response, targets, per_filter=True).tolist(),
        rel_mse_f32=f32, rel_mse_f32_per_filter=list(f32_per_filter),
        cancellation=cancellation_factor(B, C, targets),
    )


def predicted_float32_error(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, seq_len: int) -> float:
    """Order-of-magnitude relative MSE of a float32 run of the system, from its cancellation alone.

    Rounding each of the h terms of an output costs about eps32 * |B_j C_jk|, so the float32 error
    relative to the filter bank is about (eps32 * max_k sum_j |B_j C_jk| / max_{t,k} |h_k(t)|)^2, with h
    the system's own impulse response (its peak taken over the first 8192 steps at most, which can only
    raise the estimate). For our fits it overestimates the measured error 10-30x.
    """
    peak = impulse_response_ref(A, B, C, min(seq_len, 8192)).abs().max()
    terms = (B[:, None] * C).abs().sum(dim=0).max()
    return float((_EPS32 * terms / peak) ** 2) if peak > 0 else math.inf


def _metadata(fit: LDSFit, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The file's metadata, `extra` entries (e.g. the cache's solver revision) and the content hash."""
    meta = {
        "format": FORMAT,
        "version": str(fit.version),
        "seq_len": str(fit.seq_len),
        "num_filters": str(fit.num_filters),
        "variant": fit.variant,
        "method": fit.method,
        "state_dim": str(fit.state_dim),
        "rel_mse_f64": repr(float(fit.rel_mse_f64)),
        "rel_mse_f64_per_filter": json.dumps([float(v) for v in fit.rel_mse_f64_per_filter]),
        "rel_mse_f32": repr(float(fit.rel_mse_f32)),
        "rel_mse_f32_per_filter": json.dumps([float(v) for v in fit.rel_mse_f32_per_filter]),
        "cancellation": repr(float(fit.cancellation)),
        "float32_check": "plain float32 recurrence, Gaussian input (seed 0, length seq_len), against the "
        "float64 convolution of that input with the filters",
        **(extra or {}),
    }
    meta[HASH_KEY] = content_hash({"A": fit.A, "B": fit.B, "C": fit.C}, meta)
    return meta


def content_hash(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """sha256 of the float64 tensors and every metadata entry but the hash itself."""
    tensors = {name: t.detach().to(torch.float64) for name, t in tensors.items()}
    return tensor_hash(tensors, **{k: v for k, v in meta.items() if k != HASH_KEY})


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors encoding with sorted keys: u64 header size, JSON header, raw little-endian data."""
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    chunks, offset = [], 0
    for name in sorted(tensors):
        data = tensors[name].detach().to(torch.float64).contiguous().cpu().numpy().astype("<f8").tobytes()
        shape = list(tensors[name].shape)
        header[name] = {"dtype": "F64", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def fit_bytes(fit: LDSFit, extra: dict[str, str] | None = None) -> bytes:
    """The file's bytes for `fit` (see the module doc), with `extra` metadata entries."""
    return _safetensors_bytes({"A": fit.A, "B": fit.B, "C": fit.C}, _metadata(fit, extra))


def save_fit(fit: LDSFit, path: str | os.PathLike) -> None:
    """Write `fit` to a safetensors file atomically (`spectralds.io.atomic_write`)."""
    atomic_write(path, fit_bytes(fit))


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    input_file(path, "LDS fit file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # the reader signals truncation and corruption with several types
        reason = " ".join(str(err).split()) or type(err).__name__
        raise UserError(f"{path} is not a readable safetensors file ({reason})") from None
    return tensors, metadata


def _parse(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> LDSFit:
    def bad(what: str) -> UserError:
        return UserError(f"{path} is not a valid LDS fit: {what}")

    if meta.get("format") != FORMAT:
        raise bad(f"metadata 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    for name in ("A", "B", "C"):
        if name not in tensors:
            raise bad(f"tensor {name!r} is missing")
        if tensors[name].dtype != torch.float64:
            raise bad(f"tensor {name!r} is {tensors[name].dtype}, expected torch.float64")
    try:
        fit = LDSFit(
            A=tensors["A"], B=tensors["B"], C=tensors["C"],
            seq_len=int(meta["seq_len"]), num_filters=int(meta["num_filters"]), variant=meta["variant"],
            method=meta["method"], rel_mse_f64=float(meta["rel_mse_f64"]),
            rel_mse_f64_per_filter=[float(v) for v in json.loads(meta["rel_mse_f64_per_filter"])],
            rel_mse_f32=float(meta["rel_mse_f32"]),
            rel_mse_f32_per_filter=[float(v) for v in json.loads(meta["rel_mse_f32_per_filter"])],
            cancellation=float(meta["cancellation"]), version=int(meta["version"]),
        )
        state_dim = int(meta["state_dim"])
    except KeyError as err:
        raise bad(f"metadata {err.args[0]!r} is missing") from None
    except (ValueError, TypeError) as err:
        raise bad(f"unreadable metadata ({err})") from None
    if fit.version > VERSION:
        raise bad(f"format version {fit.version} is newer than this library's {VERSION}")
    # Sizes no fit can have: refused here rather than failing later in a layer or a division.
    if not 1 <= fit.seq_len <= MAX_SEQ_LEN:
        raise bad(f"metadata seq_len={fit.seq_len} (must be between 1 and {MAX_SEQ_LEN})")
    if not 1 <= fit.num_filters <= fit.seq_len:
        raise bad(f"metadata num_filters={fit.num_filters} (must be between 1 and seq_len={fit.seq_len})")
    if state_dim < 1:
        raise bad(f"metadata state_dim={state_dim} (must be >= 1)")
    h, width = state_dim, 2 * fit.num_filters
    if fit.A.shape != (h,) or fit.B.shape != (h,) or fit.C.shape != (h, width):
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in (("A", fit.A), ("B", fit.B), ("C", fit.C)))
        raise bad(f"shapes {shapes} do not match state_dim={h}, 2*num_filters={width}")
    check_size(f"{path}: measuring {h:,} states at seq_len {fit.seq_len}", fit.seq_len * (h + width))
    errors = {"rel_mse_f64": [fit.rel_mse_f64], "rel_mse_f32": [fit.rel_mse_f32],
              "cancellation": [fit.cancellation], "rel_mse_f64_per_filter": fit.rel_mse_f64_per_filter,
              "rel_mse_f32_per_filter": fit.rel_mse_f32_per_filter}
    for key, values in errors.items():  # measurements the file reports: NaN (not measured) or >= 0
        if any(v < 0 for v in values):
            raise bad(f"metadata {key} holds {min(values)!r} (must be >= 0)")
        if key.endswith("per_filter") and len(values) not in (0, width):
            raise bad(f"metadata {key} has {len(values)} entries, expected 2*num_filters={width}")
    if not all(bool(t.isfinite().all()) for t in (fit.A, fit.B, fit.C)):
        raise bad("A, B or C holds a non-finite value")
    if bool((fit.A.abs() > 1).any()):
        raise bad(f"max |A| = {float(fit.A.abs().max())!r} > 1, the system is unstable")
    return fit


def hash_status(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """"ok", "missing" (a file from before hashes) or "mismatch" (altered or corrupted)."""
    if HASH_KEY not in meta:
        return "missing"
    return "ok" if meta[HASH_KEY] == content_hash(tensors, meta) else "mismatch"


def read_fit(path: str | os.PathLike) -> tuple[LDSFit, dict[str, str], str]:
    """(fit, metadata, `hash_status`) of a structurally valid file; one-line UserError otherwise."""
    path = Path(path)
    tensors, meta = _read(path)
    fit = _parse(path, tensors, meta)
    return fit, meta, hash_status(tensors, meta)


def filter_error(fit: LDSFit, filters: torch.Tensor) -> float:
    """Relative MSE of the fit's impulse response against the 2K targets of `filters` (L, K), L <= seq_len:
    the "+" filters in their column order, then the alternating ones."""
    phi = filters.detach().to("cpu", torch.float64)
    return float(relative_mse(impulse_response_ref(fit.A, fit.B, fit.C, phi.shape[0]), target_filters(phi)))


def load_fit(
    path: str | os.PathLike,
    expect_seq_len: int | None = None,
    expect_num_filters: int | None = None,
    expect_variant: str | None = None,
    expect_filters: torch.Tensor | bool | None = None,
    max_filter_error: float = FILTER_ERROR_LIMIT,
) -> LDSFit:
    """Read and validate an LDS fit file; raise a one-line UserError naming the file and the problem.

    ``expect_*`` check the fit against the model that will use it (None: not checked). The content
    hash must match (a file without one, from an older version, loads with a warning that it is
    unverified). ``expect_filters`` (a (L, K) tensor, L <= the fit's seq_len, or True for the fit's own
    `spectral_filters(seq_len, num_filters, variant)`) measures the impulse response against those
    filters, order and signs included, and refuses a relative MSE above ``max_filter_error``. Warns
    when the system's cancellation predicts a float32 relative MSE above 1e-6 (see
    `predicted_float32_error`).
    """
    path = Path(path)
    fit, _, status = read_fit(path)
    if status == "mismatch":
        raise UserError(f"{path} fails its content hash: the file was altered or corrupted")
    if status == "missing":
        warnings.warn(f"{path} has no content hash (an older file): loading it unverified", stacklevel=2)
    for name, want, got in (
        ("seq_len", expect_seq_len, fit.seq_len),
        ("num_filters", expect_num_filters, fit.num_filters),
        ("variant", expect_variant, fit.variant),
    ):
        if want is not None and want != got:
            raise UserError(f"{path} was fitted with {name}={got!r}, but {name}={want!r} was expected")
    if expect_filters is not None and expect_filters is not False:
        check_filters(path, fit, expect_filters, max_filter_error)
    predicted = predicted_float32_error(fit.A, fit.B, fit.C, fit.seq_len)
    if predicted > FLOAT32_WARN_LEVEL:
        warnings.warn(
            f"{path}: the LDS terms cancel heavily; a float32 run is predicted to reach only relative MSE "
            f"~{predicted:.1e} (run it in float64 or refit)",
            stacklevel=2,
        )
    return fit


def check_filters(path: Path, fit: LDSFit, filters: torch.Tensor | bool, limit: float) -> float:
    """`filter_error` of `fit` against `filters` (True: its own spectral filters); refuses above `limit`."""
    check_float("max_filter_error", limit, minimum=0.0, strict=True)
    if filters is True:
        filters = spectral_filters(fit.seq_len, fit.num_filters, fit.variant)
    if not isinstance(filters, torch.Tensor) or filters.dim() != 2:
        got = f"shape {tuple(filters.shape)}" if isinstance(filters, torch.Tensor) else type(filters).__name__
        raise UserError(f"expect_filters must be a (seq_len, num_filters) tensor or True, got {got}")
    length, k = filters.shape
    if k != fit.num_filters or not 1 <= length <= fit.seq_len:
        raise UserError(f"{path} holds {fit.num_filters} filters of length {fit.seq_len}; it cannot serve "
                        f"filters of shape {(length, k)}")
    error = filter_error(fit, filters)
    if not error <= limit:
        raise UserError(f"{path}: its impulse response misses the expected filters by relative MSE "
                        f"{error:.2e} (> {limit:g}); wrong filter order, signs or variant?")
    return error
