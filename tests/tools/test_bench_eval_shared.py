"""tools/bench_eval.py --shared: its items share one context of the asked length, and it prints a row per
model kind and context with both times, the speed-up and the largest relative score difference."""

import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))
import bench_eval  # noqa: E402


def test_items_share_a_context_of_the_asked_length():
    items = bench_eval.shared_items(3, 100)
    assert len(items) == 12
    for i in range(3):
        group = items[4 * i : 4 * i + 4]
        assert len({r.args[0] for r in group}) == 1 and len(group[0].args[0]) == 100
        assert all(36 <= len(r.args[1]) <= 44 and r.args[1].startswith(" ") for r in group)


def test_shared_bench_prints_speed_up_and_difference(capsys):
    bench_eval.main(["--shared", "--kinds", "lds", "hybrid", "--contexts", "40", "--items", "2",
                     "--batch-size", "4"])
    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\| (lds|hybrid) \|", line)]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "40" and cells[5].endswith("x")
        assert float(cells[6]) <= 1e-5  # the scores of both paths agree
