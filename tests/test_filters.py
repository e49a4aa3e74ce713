"""Tests for spectralds.filters: Lanczos vs dense eigh, signs, variants, tensor filters, cache, errors."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spectralds import filters
from spectralds.filters import hankel_eigenvalues, hankel_matrix, spectral_filters, tensor_filters
from spectralds.io import cache_dir

EPS = torch.finfo(torch.float64).eps


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECTRALDS_CACHE_DIR", str(tmp_path / "cache"))


def rel_mse_per_filter(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).sum(0) / (b**2).sum(0)


def dense_reference(seq_len: int, k: int, variant: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigenvalues and filters from one plain dense eigh, and (eps * sigma_1 / gap_k)^2 per filter: how
    well float64 determines each eigenvector (Davis-Kahan), the floor for any two solvers' agreement."""
    evals, evecs = torch.linalg.eigh(hankel_matrix(seq_len, variant))
    evals, evecs = evals.flip(0), evecs.flip(1)[:, :k]
    evecs = evecs * torch.sign(evecs.gather(0, evecs.abs().argmax(0, keepdim=True)))
    right = evals[:k] - evals[1 : k + 1]  # gap to the next eigenvalue, then to the previous one
    left = torch.cat([torch.tensor([math.inf], dtype=torch.float64), right[:-1]])
    return evals[:k], evecs * evals[:k] ** 0.25, (EPS * evals[0] / torch.minimum(left, right)) ** 2


@pytest.mark.parametrize(
    ("variant", "seq_len", "k"), [("hankel", 1024, 16), ("hankel_L", 1024, 24), ("hankel_L", 700, 16)]
)
def test_lanczos_matches_eigh(variant, seq_len, k):
    fast = spectral_filters(seq_len, k, variant, method="lanczos", use_cache=False)
    evals, ref, floor = dense_reference(seq_len, k, variant)
    lanczos_evals = hankel_eigenvalues(seq_len, k, variant, method="lanczos")
    torch.testing.assert_close(lanczos_evals, evals, atol=100 * EPS * evals[0], rtol=0)
    per_filter = rel_mse_per_filter(fast, ref)
    assert ((fast - ref) ** 2).sum() / (ref**2).sum() <= 1e-15
    # Each filter agrees with eigh as closely as float64 determines it (1e-15 or far below where the
    # eigenvalue gap allows; the tail of "hankel" is limited by eigh's own rounding).
    assert (per_filter <= 1000 * floor + 1e-26).all(), per_filter
    assert (per_filter[:12] <= 1e-15).all()


@pytest.mark.parametrize("variant", ["hankel", "hankel_L"])
def test_lanczos_eigenpairs_at_4096(variant):
    """Residuals, orthonormality and sign at a length where dense eigh is slow: check with a dense mat-vec."""
    k = 24
    evals = hankel_eigenvalues(4096, k, variant, method="lanczos")
    bank = spectral_filters(4096, k, variant, method="lanczos", use_cache=False)
    vecs = bank / evals**0.25
    assert (evals[:-1] > evals[1:]).all()
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(k, dtype=torch.float64), atol=1e-13, rtol=0)
    residual = hankel_matrix(4096, variant) @ vecs - vecs * evals
    assert residual.norm(dim=0).max() <= 1e-13 * evals[0]  # backward stable; a dense mat-vec has ~1e-14
    assert (vecs.gather(0, vecs.abs().argmax(0, keepdim=True)) > 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["hankel", "hankel_L"])
def test_lanczos_matches_eigh_4096(variant):
    k = 24
    fast = spectral_filters(4096, k, variant, method="lanczos", use_cache=False)
    _, ref, floor = dense_reference(4096, k, variant)
    assert ((fast - ref) ** 2).sum() / (ref**2).sum() <= 1e-15
    assert (rel_mse_per_filter(fast, ref) <= 1000 * floor + 1e-26).all()


def test_eigh_filters_are_scaled_orthonormal_eigenvectors():
    z = hankel_matrix(300)
    evals = torch.linalg.eigvalsh(z).flip(0)[:10]
    bank = spectral_filters(300, 10, method="eigh", use_cache=False)
    vecs = bank / evals**0.25
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(10, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(z @ vecs, vecs * evals, atol=1e-15, rtol=0)
    torch.testing.assert_close(hankel_eigenvalues(300, 10), evals, atol=1e-16, rtol=0)


@settings(max_examples=20, deadline=None)
@given(
    seq_len=st.integers(1, 96),
    frac=st.floats(0.0, 1.0),
    variant=st.sampled_from(["hankel", "hankel_L", "tensor"]),
)
def test_any_small_bank_is_well_formed(seq_len, frac, variant):
    k = max(1, round(frac * seq_len))
    bank = spectral_filters(seq_len, k, variant, dtype=torch.float32, use_cache=False)
    assert bank.shape == (seq_len, k) and bank.dtype == torch.float32 and bank.isfinite().all()
    assert (bank.gather(0, bank.abs().argmax(0, keepdim=True)) >= 0).all()
    if variant != "tensor":  # column norms are eigenvalue ** 0.25, clamped at 0 below resolution
        norms = bank.double().norm(dim=0)
        assert (norms[:-1] >= norms[1:] - 1e-6).all()


def test_canonical_sign_and_column_order():
    for method in ("eigh", "lanczos"):
        bank = spectral_filters(600, 12, method=method, use_cache=False)
        peak = bank.gather(0, bank.abs().argmax(0, keepdim=True))
        assert (peak > 0).all()
        norms = bank.norm(dim=0)  # = eigenvalue ** 0.25
        assert (norms[:-1] > norms[1:]).all()


@pytest.mark.parametrize("variant", ["hankel", "hankel_L"])
def test_hankel_matrix_entries(variant):
    def entry(i: int, j: int) -> Fraction:  # 1-based, exact
        s = i + j
        if variant == "hankel":
            return Fraction(2, s**3 - s)
        return ((-1) ** (s - 2) + 1) * Fraction(8, (s + 3) * (s - 1) * (s + 1))

    z = hankel_matrix(7, variant)
    expected = torch.tensor([[float(entry(i, j)) for j in range(1, 8)] for i in range(1, 8)], dtype=z.dtype)
    torch.testing.assert_close(z, expected, rtol=1e-15, atol=0)


def test_small_length_with_many_filters_uses_eigh():
    # Most of these 48 eigenvalues are below float64 resolution: auto (eigh) still returns a bank.
    bank = spectral_filters(64, 48)
    assert bank.shape == (64, 48) and bank.isfinite().all()
    torch.testing.assert_close(bank, spectral_filters(64, 48, method="eigh", use_cache=False))
    with pytest.raises(ValueError, match="resolvable"):
        spectral_filters(64, 48, method="lanczos", use_cache=False)


def test_unresolvable_lanczos_request_falls_back_in_auto():
    # At L = 600 only ~20 "hankel" eigenvalues sit above RESOLUTION * sigma_1.
    with pytest.raises(ValueError, match="resolvable"):
        spectral_filters(600, 24, method="lanczos", use_cache=False)
    auto = spectral_filters(600, 24, use_cache=False)
    torch.testing.assert_close(auto, spectral_filters(600, 24, method="eigh", use_cache=False))


def test_tensor_filters_are_ranked_kronecker_products():
    l1, l2, k1, k2 = 16, 8, 5, 4
    fine, coarse = spectral_filters(l1, k1), spectral_filters(l2, k2)
    bank = tensor_filters(l1, l2, k1, k2)
    assert bank.shape == (l1 * l2, k1 * k2)
    full = torch.kron(coarse, fine)  # row t2 * l1 + t1, column j * k1 + i
    # Same set of columns, each matched exactly once.
    match = torch.cdist(bank.T, full.T).argmin(dim=1)
    assert sorted(match.tolist()) == list(range(k1 * k2))
    torch.testing.assert_close(bank, full[:, match], rtol=0, atol=1e-15)
    weights = bank.norm(dim=0)  # (sigma_i sigma_j) ** 0.25: the factor eigenvectors have unit norm
    assert (weights[:-1] >= weights[1:]).all()
    torch.testing.assert_close(tensor_filters(l1, l2, k1, k2, num_filters=7), bank[:, :7])
    t1, t2 = 3, 5
    i, j = match[2].item() % k1, match[2].item() // k1
    assert bank[t2 * l1 + t1, 2] == fine[t1, i] * coarse[t2, j]


def test_tensor_variant_shape_and_truncation():
    seq_len, k = 100, 6
    l1, l2 = 16, 7  # smallest power of two >= ceil(sqrt(100)) = 10; ceil(100 / 16)
    bank = spectral_filters(seq_len, k, "tensor", use_cache=False)
    full = tensor_filters(l1, l2, k, k, num_filters=k)[:seq_len]
    peak = full.gather(0, full.abs().argmax(0, keepdim=True))
    torch.testing.assert_close(bank, full * peak.sign())
    assert bank.shape == (seq_len, k)


def test_tensor_filters_follow_the_vandermonde_factorization():
    """mu_a = kron(mu_(a^L1)^(L2), mu_a^(L1)) lies close to the bank's span; a mis-indexed bank does not."""
    l1, l2, k = 32, 16, 36
    bank = tensor_filters(l1, l2, 8, 8, num_filters=k)
    scrambled = bank.reshape(l1, l2, k).transpose(0, 1).reshape(l1 * l2, k)  # rows read as t1 * l2 + t2
    t = torch.arange(l1 * l2, dtype=torch.float64)

    def residual(basis: torch.Tensor, alpha: float) -> float:
        mu = alpha**t
        q, _ = torch.linalg.qr(basis)
        return float((mu - q @ (q.T @ mu)).norm() / mu.norm())

    for alpha in (0.5, 0.9, 0.99):
        assert residual(bank, alpha) < 0.05
        assert residual(scrambled, alpha) > 10 * residual(bank, alpha)


def test_cache_hit_miss_and_corrupt_file(monkeypatch):
    path = filters._cache_path(200, 8, "hankel", "auto")
    assert str(path).startswith(str(cache_dir())) and not path.exists()
    first = spectral_filters(200, 8, dtype=torch.float32)
    assert path.exists() and first.dtype == torch.float32
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]

    def fail(*args):
        raise AssertionError("cache miss: recomputed")

    with monkeypatch.context() as patch:
        patch.setattr(filters, "_compute", fail)
        cached = spectral_filters(200, 8)  # hit: no recomputation
    assert cached.dtype == torch.float64
    torch.testing.assert_close(cached.float(), first)

    path.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="recomputing"):
        again = spectral_filters(200, 8)
    torch.testing.assert_close(again, cached)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten file is valid
        torch.testing.assert_close(spectral_filters(200, 8), cached)


def test_use_cache_false_writes_nothing():
    spectral_filters(50, 4, use_cache=False)
    assert not cache_dir().exists() or not any(cache_dir().iterdir())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"seq_len": 0, "num_filters": 1}, ValueError, "seq_len"),
        ({"seq_len": 10, "num_filters": 0}, ValueError, "num_filters"),
        ({"seq_len": 10, "num_filters": 11}, ValueError, "num_filters"),
        ({"seq_len": 10, "num_filters": 2, "variant": "toeplitz"}, ValueError, "variant"),
        ({"seq_len": 10, "num_filters": 2, "method": "qr"}, ValueError, "method"),
        ({"seq_len": 10.0, "num_filters": 2}, TypeError, "seq_len"),
        ({"seq_len": 10, "num_filters": 2, "dtype": torch.int64}, TypeError, "dtype"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    with pytest.raises(error, match=match):
        spectral_filters(**kwargs)


def test_tensor_filters_bad_inputs():
    with pytest.raises(ValueError, match="k1"):
        tensor_filters(4, 4, 5, 2)
    with pytest.raises(ValueError, match="num_filters"):
        tensor_filters(4, 4, 2, 2, num_filters=5)
