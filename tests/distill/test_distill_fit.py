"""Filters -> LDS fit: quality, float32 behaviour, determinism, the file format and its errors.

Small sizes only (L=512, K=8); the L=8192 targets are measured by tools/bench_distill.py.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from spectralds.distill import (
    LDSFit,
    fit_filters,
    float32_check,
    float32_recurrence,
    get_fit,
    hankel_singular_values,
    impulse_response,
    load_fit,
    predicted_float32_error,
    relative_mse,
    save_fit,
    target_filters,
)
from spectralds.distill import fit as fit_module
from spectralds.distill.lds_file import _safetensors_bytes
from spectralds.filters import spectral_filters
from spectralds.ops.lds_scan import scan_ref

L, K = 512, 8


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECTRALDS_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # tiny matrices: threads only cost time, badly so on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def phi() -> torch.Tensor:
    return spectral_filters(L, K)


@pytest.fixture(scope="module")
def fit32(phi) -> LDSFit:
    return fit_filters(L, K, 32, filters=phi, progress=False)


def _step_loop(A, B, C, u):  # the textbook recurrence, float64, for a 1-d input
    return scan_ref(u.double()[None, :, None], A.double(), B.double(), C.double())[0][0, :, 0]


# ---- measurements ---------------------------------------------------------------------------------
def test_impulse_response_matches_the_recurrence():
    g = torch.Generator().manual_seed(1)
    A = torch.rand(6, generator=g, dtype=torch.float64) * 2 - 1
    B = torch.randn(6, generator=g, dtype=torch.float64)
    C = torch.randn(6, 4, generator=g, dtype=torch.float64)
    impulse = torch.zeros(50, dtype=torch.float64)
    impulse[0] = 1
    expected = _step_loop(A, B, C, impulse)
    torch.testing.assert_close(impulse_response(A, B, C, 50), expected, rtol=1e-12, atol=1e-14)


def test_float32_recurrence_and_check(fit32, phi):
    u = torch.randn(L, generator=torch.Generator().manual_seed(2), dtype=torch.float32)
    y32 = float32_recurrence(fit32.A, fit32.B, fit32.C, u)
    assert y32.dtype == torch.float32 and y32.shape == (L, 2 * K)
    y64 = _step_loop(fit32.A, fit32.B, fit32.C, u.double())
    assert relative_mse(y32, y64) < 1e-11
    overall, per_filter = float32_check(fit32.A, fit32.B, fit32.C, target_filters(phi))
    assert len(per_filter) == 2 * K and overall == fit32.rel_mse_f32 < 1e-11
    exact = torch.stack([torch.stack([phi[: t + 1, k].flip(0) @ u.double()[: t + 1] for k in range(K)])
                         for t in range(0, L, 37)])  # direct O(L^2) convolution at a few times
    assert relative_mse(y32[::37, :K], exact) < 1e-10


def test_relative_mse():
    target = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    pred = torch.tensor([[1.0, 2.0], [1.0, 0.0]])
    assert relative_mse(pred, target) == pytest.approx(1 / 5)
    assert relative_mse(pred, target, per_filter=True).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="shape"):
        relative_mse(pred, target[:1])


def test_hankel_singular_values_are_exact_when_every_lag_is_sampled():
    # At L=128 the geometric lag grid holds every lag (unit weights): rows t <= 62, columns s <= 63.
    phi = spectral_filters(128, K)
    idx = torch.arange(63)[:, None] + torch.arange(64)[None, :]
    exact = torch.linalg.svdvals(torch.cat([phi[idx, k] for k in range(K)]))[:30]
    torch.testing.assert_close(hankel_singular_values(phi, 30), exact / exact[0], rtol=1e-9, atol=1e-15)
    values = hankel_singular_values(spectral_filters(L, K), 40)
    assert values[0] == 1 and bool((values[1:] <= values[:-1]).all()) and values[30] < 1e-7


# ---- fit quality ----------------------------------------------------------------------------------
def test_varpro_fit_quality(fit32):
    # measured: 2.4e-16 overall, 7.6e-14 worst filter, 1.2e-13 in float32
    assert fit32.rel_mse_f64 < 1e-14
    assert max(fit32.rel_mse_f64_per_filter) < 1e-11
    assert fit32.rel_mse_f32 < 1e-11
    assert fit32.A.shape == (32,) and fit32.B.shape == (32,) and fit32.C.shape == (32, 2 * K)
    assert float(fit32.A.abs().max()) < 1.0
    assert torch.equal(fit32.A, fit32.A.float().double())  # float32-representable poles
    torch.testing.assert_close(fit32.B.abs(), fit32.C.norm(dim=1))  # balanced B / C
    assert fit32.cancellation < 1e4


def test_error_falls_with_the_state_dim(phi):
    errors = [fit_filters(L, K, h, filters=phi, progress=False).rel_mse_f64 for h in (12, 20, 28)]
    assert errors[0] > 100 * errors[1] > 1e4 * errors[2]


def test_odd_state_dim_and_hankel_L():
    fit = fit_filters(L, K, 23, variant="hankel_L", progress=False)
    assert fit.state_dim == 23 and fit.variant == "hankel_L"
    assert fit.rel_mse_f64 < 1e-11  # measured 2.1e-13


def test_spectralds_baseline_runs_and_trails(phi, fit32):
    base = fit_filters(L, K, 32, method="spectralds", filters=phi, progress=False)
    assert base.method == "spectralds" and torch.equal(base.B, torch.ones(32, dtype=torch.float64))
    assert float(base.A.abs().max()) <= 1.0
    torch.testing.assert_close(base.A[16:], -base.A[:16])
    assert 1e-4 < base.rel_mse_f64 < 1e-2  # measured 4.5e-3: Algorithm 2 with K=8 plateaus
    assert base.rel_mse_f64 > 1e6 * fit32.rel_mse_f64


def test_fit_is_deterministic(phi, fit32, tmp_path):
    again = fit_filters(L, K, 32, filters=phi.T.contiguous().T, progress=False)  # column-major copy
    save_fit(fit32, tmp_path / "a.safetensors")
    save_fit(again, tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_progress_bar_only_when_asked(phi, capsys):
    fit_filters(L, K, 8, method="spectralds", filters=phi, progress=False)
    assert capsys.readouterr().err == ""
    fit_filters(L, K, 8, method="spectralds", filters=phi, progress=True)
    assert "LDS fit" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((L, K, 31), {"method": "spectralds"}, ValueError, "even"),
        ((L, K, L // 4 + 1), {}, ValueError, "state_dim"),
        ((L, K, 0), {}, ValueError, "state_dim"),
        ((L, K, 8), {"method": "magic"}, ValueError, "method"),
        ((L, K, 8.0), {}, TypeError, "state_dim"),
        ((L, 0, 8), {}, ValueError, "num_filters"),
        ((L, K, 8), {"filters": torch.zeros(L, K + 1)}, ValueError, "filters"),
        ((L, K, 8), {"variant": "nope"}, ValueError, "variant"),
    ],
)
def test_bad_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        fit_filters(*args, progress=False, **kwargs)


# ---- files ----------------------------------------------------------------------------------------
def test_save_load_round_trip(fit32, tmp_path):
    path = tmp_path / "fit.safetensors"
    save_fit(fit32, path)
    loaded = load_fit(path, expect_seq_len=L, expect_num_filters=K, expect_variant="hankel")
    for name in ("A", "B", "C"):
        assert torch.equal(getattr(loaded, name), getattr(fit32, name))
        assert getattr(loaded, name).dtype == torch.float64
    for name in ("seq_len", "num_filters", "variant", "method", "state_dim", "rel_mse_f64", "rel_mse_f32",
                 "rel_mse_f64_per_filter", "rel_mse_f32_per_filter", "cancellation", "version"):
        assert getattr(loaded, name) == getattr(fit32, name), name
    with safe_open(str(path), framework="pt") as f:  # plain safetensors, readable by anyone
        meta = f.metadata()
        assert sorted(f.keys()) == ["A", "B", "C"]
    assert meta["seq_len"] == str(L) and meta["variant"] == "hankel" and meta["state_dim"] == "32"
    assert not list(tmp_path.glob("*.tmp"))


def _write(path, tensors, fit: LDSFit, **meta_changes):
    from spectralds.distill.lds_file import _metadata

    meta = {**_metadata(fit), **meta_changes}
    path.write_bytes(_safetensors_bytes(tensors, meta))
    return path


def _assert_one_line_error(path, match, **expect):
    with pytest.raises(ValueError, match=match) as info:
        load_fit(path, **expect)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_load_errors(fit32, tmp_path):
    good = tmp_path / "good.safetensors"
    save_fit(fit32, good)
    blob = good.read_bytes()
    abc = {"A": fit32.A, "B": fit32.B, "C": fit32.C}

    _assert_one_line_error(tmp_path / "missing.safetensors", "does not exist")
    (tmp_path / "cut.safetensors").write_bytes(blob[: len(blob) // 2])
    _assert_one_line_error(tmp_path / "cut.safetensors", "not a readable safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"this is not a tensor file")
    _assert_one_line_error(tmp_path / "junk.safetensors", "not a readable safetensors")
    _assert_one_line_error(good, "seq_len=512, but seq_len=1024", expect_seq_len=1024)
    _assert_one_line_error(good, "num_filters", expect_num_filters=24)
    _assert_one_line_error(good, "variant", expect_variant="hankel_L")

    bad_shape = _write(tmp_path / "shape.safetensors", {**abc, "C": fit32.C[:, :K]}, fit32)
    _assert_one_line_error(bad_shape, "shapes")
    unstable = _write(tmp_path / "unstable.safetensors", {**abc, "A": fit32.A * 1.01}, fit32)
    _assert_one_line_error(unstable, "unstable")
    nan = _write(tmp_path / "nan.safetensors", {**abc, "B": fit32.B * math.nan}, fit32)
    _assert_one_line_error(nan, "non-finite")
    no_meta = _write(tmp_path / "meta.safetensors", abc, fit32, seq_len="many")
    _assert_one_line_error(no_meta, "metadata")
    save_file({"A": fit32.A}, str(tmp_path / "foreign.safetensors"))
    _assert_one_line_error(tmp_path / "foreign.safetensors", "format")
    float32_file = tmp_path / "f32.safetensors"
    tensors = {"A": fit32.A.float(), "B": fit32.B, "C": fit32.C}
    save_file(tensors, str(float32_file), metadata={"format": "spectralds-lds"})
    _assert_one_line_error(float32_file, "float32")


def test_cancelling_terms_warn_on_load_and_fail_in_float32(fit32, phi, tmp_path):
    # two states whose terms cancel exactly in float64 (1e5 * 0.5^t - 1e5 * 0.5^t) but not in float32
    A = torch.cat([fit32.A, torch.tensor([0.5, 0.5], dtype=torch.float64)])
    B = torch.cat([fit32.B, torch.tensor([1e5, 1.0], dtype=torch.float64)])
    ones = torch.ones(1, 2 * K, dtype=torch.float64)
    C = torch.cat([fit32.C, ones, -1e5 * ones])
    targets = target_filters(phi)
    assert relative_mse(impulse_response(A, B, C, L), targets) == pytest.approx(fit32.rel_mse_f64, rel=1e-3)
    assert float32_check(A, B, C, targets)[0] > 1e3 * fit32.rel_mse_f32
    assert predicted_float32_error(A, B, C, L) > 1e-6 > predicted_float32_error(fit32.A, fit32.B, fit32.C, L)
    bad = LDSFit(A=A, B=B, C=C, seq_len=L, num_filters=K, variant="hankel", method="varpro")
    save_fit(bad, tmp_path / "cancel.safetensors")
    with pytest.warns(UserWarning, match="cancel"):
        load_fit(tmp_path / "cancel.safetensors")
    save_fit(fit32, tmp_path / "fine.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_fit(tmp_path / "fine.safetensors")


def test_get_fit_caches_and_heals(tmp_path, monkeypatch):
    first = get_fit(256, 4, 8, progress=False)
    files = list((tmp_path / "cache").glob("lds_*.safetensors"))
    assert [f.name for f in files] == ["lds_hankel_L256_K4_h8_varpro_v1r4.safetensors"]

    def refuse(*args, **kwargs):
        raise AssertionError("should have come from the cache")

    monkeypatch.setattr(fit_module, "fit_filters", refuse)
    cached = get_fit(256, 4, 8, progress=False)
    assert torch.equal(cached.C, first.C) and cached.rel_mse_f64 == first.rel_mse_f64
    monkeypatch.undo()
    monkeypatch.setenv("SPECTRALDS_CACHE_DIR", str(tmp_path / "cache"))
    files[0].write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="recomputing"):
        healed = get_fit(256, 4, 8, progress=False)
    assert torch.equal(healed.C, first.C)
    assert load_fit(files[0]).rel_mse_f64 == first.rel_mse_f64
