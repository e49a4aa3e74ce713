"""tools/distill_table.py: its state-dim search on known error curves, and a --quick run end to end."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from spectralds.distill import fit_filters
from spectralds.filters import RESOLUTION, hankel_eigenvalues, spectral_filters

TOOLS = Path(__file__).resolve().parents[2] / "tools"


@pytest.fixture(scope="module")
def table():
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    return importlib.import_module("distill_table")


def _geometric(calls: list[int]):
    def evaluate(h: int) -> float:
        calls.append(h)
        return 10.0 ** (-h / 2)  # reaches 1e-12 first at h = 24

    return evaluate


@pytest.mark.parametrize("guess", [2, 7, 24, 26, 60, 500])
def test_search_finds_the_smallest_even_h(table, guess):
    calls: list[int] = []
    errors: dict[int, float] = {}
    assert table.smallest_state_dim(_geometric(calls), errors, 1e-12, guess, cap=200) == 24
    assert errors[22] > 1e-12 >= errors[24]  # bracketed by its own evaluations
    assert all(h % 2 == 0 and 2 <= h <= 200 for h in calls) and len(calls) == len(set(calls))
    # steps of 4, 8, 16 ... then bisection: logarithmic in the guess's distance, not a scan
    assert len(calls) <= 2 * math.ceil(math.log2(abs(min(guess, 200) - 24) + 4)) + 1


def test_search_shares_fits_and_respects_the_cap(table):
    calls: list[int] = []
    errors: dict[int, float] = {}
    evaluate = _geometric(calls)
    assert table.smallest_state_dim(evaluate, errors, 1e-12, 24, cap=41) == 24
    first = len(calls)
    assert table.smallest_state_dim(evaluate, errors, 1e-16, 24, cap=41) == 32
    assert len(calls) - first <= 4  # the 1e-12 fits already bound the 1e-16 search from below
    assert table.smallest_state_dim(evaluate, errors, 1e-30, 40, cap=41) is None
    assert max(calls) == 40  # the cap, made even, and nothing above it


def test_extrapolated_guess(table):
    errors = {h: 10.0 ** (-h / 2) for h in (20, 22)}
    assert table.extrapolated_guess(errors, 22, 1e-16) == 32  # one decade per 2 states
    assert table.extrapolated_guess(errors, 22, 1e-3) == 22  # already reached
    assert table.extrapolated_guess({20: 1e-12, 22: 1e-12}, 22, 1e-16) is None  # flat: no line
    assert table.extrapolated_guess(errors, 20, 1e-16) is None  # no fit at h - 2


def test_cell_search_avoids_stalled_fits(table, monkeypatch):
    """Fits far above the needed h can stall (seen at L=4096, K=25); the second target's guess comes from
    the cell's own error curve, not from Hankel singular values that floor far above it."""
    def fake_fit(seq_len, num_filters, h, phi, variant):
        f64 = 10.0 ** (-h / 2) if h <= 50 else 1e-15  # reaches 1e-12 at 24, 1e-16 at 32; stalls above 50
        return {"state_dim": h, "f64": f64, "f64_worst": f64, "f32": 1e-10, "layout": "joint", "fit_s": 0.0}

    monkeypatch.setattr(table, "fit_record", fake_fit)
    floored = torch.tensor([max(10.0 ** (-h / 4), 1e-7) for h in range(300)], dtype=torch.float64)
    monkeypatch.setattr(table, "hankel_singular_values", lambda filters, count: floored[:count])
    args = argparse.Namespace(cap=200, variant="hankel", targets=[1e-12, 1e-16])
    record = table.Table(args).fit_bank(1024, 8, torch.zeros(1024, 8, dtype=torch.float64), 0.0)
    assert [record["targets"][t].get("state_dim") for t in ("1e-12", "1e-16")] == [24, 32]
    assert all(r["state_dim"] <= 50 for r in record["evaluations"])


def test_hsv_guess(table):
    hsv = [10.0 ** (-h / 4) for h in range(60)]
    assert table.hsv_guess(hsv, 1e-12, 1.0) == 24
    assert table.hsv_guess(hsv, 1e-12, 100.0) == 28
    assert table.hsv_guess(hsv, 1e-40, 1.0) == 60  # beyond the values: the caller clamps to its cap


def test_quick_table(table, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPECTRALDS_CACHE_DIR", str(tmp_path / "cache"))
    out = {k: tmp_path / f"table.{k}" for k in ("json", "md", "png")}
    paths = ["--json", str(out["json"]), "--md", str(out["md"]), "--plot", str(out["png"])]
    cells = table.main(["--quick", *paths])
    printed = capsys.readouterr().out
    assert json.loads(out["json"].read_text())["records"] == json.loads(json.dumps(cells))
    assert out["png"].read_bytes()[:4] == b"\x89PNG"
    md = out["md"].read_text()
    assert md in printed and "| L \\ K | 4 | 24 |" in md
    assert {(c["seq_len"], c["num_filters"]) for c in cells} == {(L, K) for L in (128, 256) for K in (4, 24)}
    for cell in cells:
        L, K = cell["seq_len"], cell["num_filters"]
        # the resolvable count is the filters module's threshold, checked here on dense eigh eigenvalues
        sigma = hankel_eigenvalues(L, K, method="eigh")
        assert cell["resolvable"] == min(K, int((sigma >= RESOLUTION * sigma[0]).sum()))
        assert cell["filters_fitted"] == min(K, cell["resolvable"])
        if cell["resolvable"] < K:
            assert f"K > resolvable ({cell['resolvable']})" in md
        evaluated = {r["state_dim"]: r for r in cell["evaluations"]}
        for target in (1e-12, 1e-16):
            result = cell["targets"][f"{target:g}"]
            if not result["reached"]:
                assert result["cap"] in evaluated and evaluated[result["cap"]]["f64"] > target
                assert f"not reached by h<={result['cap']}" in md
                continue
            h = result["state_dim"]
            assert result["f64"] <= target and result["f32"] > 0
            assert h == 2 or evaluated[h - 2]["f64"] > target
    # the small resolvable cells reach both targets well below L/4
    assert all(c["targets"]["1e-16"]["reached"] for c in cells if c["num_filters"] == 4)
    # a reported error is that of fit_filters at the reported h
    cell = next(c for c in cells if (c["seq_len"], c["num_filters"]) == (256, 4))
    h = cell["targets"]["1e-12"]["state_dim"]
    fit = fit_filters(256, 4, h, filters=spectral_filters(256, 4, method="lanczos"), progress=False)
    assert fit.rel_mse_f64 == cell["targets"]["1e-12"]["f64"]
    assert fit.rel_mse_f32 == cell["targets"]["1e-12"]["f32"]
    assert torch.get_num_threads() >= 1
