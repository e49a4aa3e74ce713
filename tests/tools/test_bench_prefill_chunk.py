"""Smoke test of tools/bench_prefill_chunk.py: each model prefilled at once and in chunks, same logits."""

from test_tools import load_tool


def test_bench_prefill_chunk_quick(capsys):
    records = load_tool("bench_prefill_chunk").main(["--quick", "--patterns", "stu_t,attn", "lds"])
    assert [(r["model"], r["chunk"]) for r in records] == [("stu_t,attn", "all"), ("stu_t,attn", 16),
                                                           ("lds", "all"), ("lds", 16)]
    assert all(r["dlogit"] < 1e-4 and r["peak MB"] >= 0 and r["state MB"] > 0 for r in records)
    assert "max |dlogit|" in capsys.readouterr().out
