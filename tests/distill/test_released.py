"""Released LDS fit files (torch pickles in the Flash STU 2 / SpectraLDS layout) as an input."""

import pytest
import torch

from spectralds.cli_fits import import_fit
from spectralds.distill import fit_filters, load_fit
from spectralds.distill.released import import_released, measure
from spectralds.errors import UserError

L, K, H = 256, 4, 16


@pytest.fixture(scope="module")
def ours():
    return fit_filters(L, K, H, progress=False)


def released_layout(fit, flip=(0, 3, 5)):
    """Our fit as the released files hold theirs: each K-block by ascending eigenvalue, some signs flipped."""
    reverse = torch.cat([torch.arange(K - 1, -1, -1), torch.arange(2 * K - 1, K - 1, -1)])
    C = fit.C[:, reverse].clone()
    C[:, list(flip)] *= -1
    return fit.A.clone(), fit.B.clone()[None, :], C


def test_measure_reproduces_the_fit_errors(ours):
    got = measure(ours.A, ours.B, ours.C, L, K, method=ours.method)
    assert got.rel_mse_f64 == pytest.approx(ours.rel_mse_f64, rel=1e-9)
    assert got.rel_mse_f32 == pytest.approx(ours.rel_mse_f32, rel=1e-9)
    assert got.rel_mse_f64_per_filter == pytest.approx(ours.rel_mse_f64_per_filter, rel=1e-9)


@pytest.mark.parametrize("wrap", ["dict", "tuple", "list", "nested"])
def test_import_recovers_our_fit(ours, tmp_path, wrap):
    A, B, C = released_layout(ours)
    obj = {"dict": {"A": A, "B": B, "C": C}, "tuple": (A, B, C), "list": [A, B[0], C],
           "nested": {"state_dict": {"lds.A": A, "lds.B": B, "lds.C": C}, "step": 3}}[wrap]
    path = tmp_path / "phi_lds.pt"
    torch.save(obj, path)
    fit, order, flipped = import_released(path, L, K)
    assert (order, flipped) == ("reversed", 3)
    assert torch.allclose(fit.C, ours.C, rtol=0, atol=0) and torch.equal(fit.A, ours.A)
    assert fit.rel_mse_f64 == pytest.approx(ours.rel_mse_f64, rel=1e-9)
    assert fit.rel_mse_f32 == pytest.approx(ours.rel_mse_f32, rel=1e-9)


def test_import_keeps_a_file_already_in_our_order(ours, tmp_path):
    C = ours.C.clone()
    C[:, 1] *= -1
    torch.save({"A": ours.A.float(), "B": ours.B.float(), "C": C.float()}, tmp_path / "f.pt")
    fit, order, flipped = import_released(tmp_path / "f.pt", L, K)
    assert (order, flipped) == ("as given", 1)
    # float32 tensors lose digits, but the alignment still finds every column.
    assert max(fit.rel_mse_f64_per_filter) < 1e-6 and fit.rel_mse_f64 < 1e3 * max(ours.rel_mse_f64, 1e-12)


def test_unaligned_file_is_far_worse_than_the_import(ours):
    A, B, C = released_layout(ours)
    raw = measure(A, B[0], C, L, K)
    assert raw.rel_mse_f64 > 0.5  # the alignment matters: without it the file looks like a bad fit


def test_cli_writes_our_format(ours, tmp_path, capsys):
    A, B, C = released_layout(ours)
    torch.save({"A": A, "B": B, "C": C}, tmp_path / "phi_lds.pt")
    out = tmp_path / "fit.safetensors"
    import_fit(str(tmp_path / "phi_lds.pt"), seq_len=L, num_filters=K, out=str(out))  # a plain function
    assert "wrote" in capsys.readouterr().out
    loaded = load_fit(out, L, K, "hankel")
    assert loaded.method == "released" and torch.equal(loaded.C, ours.C)
    assert loaded.rel_mse_f64 == pytest.approx(ours.rel_mse_f64, rel=1e-9)


def bad_files(fit):
    A, B, C = released_layout(fit)
    nan_C = C.clone()
    nan_C[2, 1] = float("nan")
    return {
        "not a readable torch file": b"this is not a torch file",
        "expected A, B, C": {"weights": A},
        "a list of 2 items": [A, C],
        "are not A (h,)": {"A": A, "B": torch.ones(2, H, dtype=torch.float64), "C": C},
        "but --num-filters is": {"A": A, "B": B, "C": torch.cat([C, C], dim=1)},
        "the system is unstable": {"A": A * 0 + 1.5, "B": B, "C": C},
        "non-finite": {"A": A, "B": B, "C": nan_C},
        "real floating-point tensor": {"A": A, "B": B, "C": C.long()},
    }


@pytest.mark.parametrize("case", range(8))
def test_bad_files_give_one_line(ours, tmp_path, case):
    expected, content = list(bad_files(ours).items())[case]
    path = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(UserError) as info:
        import_released(path, L, K)
    message = str(info.value)
    assert expected in message and str(path) in message and "\n" not in message


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        import_released(tmp_path / "nope.pt", L, K)


def test_a_pickled_object_is_refused(tmp_path):
    import datetime
    import pickle

    # weights_only refuses any class outside torch's allow-list: a pickle never runs code on import
    (tmp_path / "code.pt").write_bytes(pickle.dumps(datetime.timedelta(days=1)))
    with pytest.raises(UserError, match="not a readable torch file"):
        import_released(tmp_path / "code.pt", L, K)


def test_bench_scores_ours_and_released_files(ours, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from spectralds.distill import save_fit

    save_fit(ours, tmp_path / "ours.safetensors")
    A, B, C = released_layout(ours)
    torch.save({"A": A, "B": B, "C": C}, tmp_path / "theirs.pt")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "SPECTRALDS_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run(
        [sys.executable, str(root / "tools" / "bench_distill.py"), "--seq-len", str(L),
         "--num-filters", str(K), "--score", str(tmp_path / "ours.safetensors"), str(tmp_path / "theirs.pt")],
        capture_output=True, text=True, env=env, check=True,
    ).stdout
    rows = [line for line in out.splitlines() if "ours.safetensors" in line or "theirs.pt" in line]
    assert len(rows) == 2 and "theirs.pt" in rows[1] and "3 signs flipped" in rows[1]
    measured = f"{ours.rel_mse_f64:.2e}"
    assert all(measured in row for row in rows)  # the same measured error, whichever layout the file has
