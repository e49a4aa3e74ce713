"""Smoke tests of the benchmark tools (tools/bench_*.py) and checks of the helpers their numbers rest on."""

from __future__ import annotations

import importlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from spectralds.layers import build_layer
from spectralds.layers.attention_masks import window_mask
from spectralds.ops.costs import attended_pairs

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def load_tool(name: str):
    """Import a tool module; the tools import their shared helpers as the top-level `_bench_common`."""
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def decode():
    return load_tool("bench_decode")


@pytest.fixture(scope="module")
def throughput():
    return load_tool("bench_throughput")


@pytest.fixture(scope="module")
def common():
    return load_tool("_bench_common")


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """The tools run with --threads 1 here (tiny ops, shared CPU); give the other tests their threads back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def read_records(path: Path) -> list[dict]:
    payload = json.loads(path.read_text())
    assert {"machine", "args", "records"} <= set(payload)
    return payload["records"]


def test_decode_quick_layers(decode, tmp_path, capsys):
    out_json, out_png = tmp_path / "decode.json", tmp_path / "decode.png"
    args = ["--quick", "--threads", "1", "--lds-system", "random-stable"]
    records = decode.main([*args, "--json", str(out_json), "--plot", str(out_png)])
    text = capsys.readouterr().out
    assert {(r["method"], r["prompt_len"]) for r in records} == {
        (m, p) for m in decode.DECODERS for p in (32, 64)
    }
    assert all(r["ms_per_token"] > 0 and math.isfinite(r["ms_per_token"]) for r in records)
    assert all(r["prefill"] == "real" and r["prefill_s"] > 0 for r in records)
    assert read_records(out_json) == records
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    assert "relative to lds (random-stable system)" in text and "lds flatness" in text
    # State sizes are exact: after 1 warm-up step the KV cache holds P + 1 = 65 keys and values in a
    # buffer that doubled from 64 to 128 slots (batch 1, 8 heads of 16 / 8 = 2 channels, float32; the
    # window, 1024, is not reached); the LDS state is (batch, dim, 80 states).
    by_key = {(r["method"], r["prompt_len"]): r for r in records}
    for method in ("attn-full", "attn-window"):
        assert by_key[method, 64]["state_mb"] * 2**20 == 2 * 8 * 128 * 2 * 4
    assert by_key["lds", 64]["state_mb"] * 2**20 == 16 * 80 * 4
    assert by_key["lds", 64]["system"] == "random-stable" and by_key["stu-naive", 64]["system"] is None


def test_decode_quick_model_with_synthetic_cache(decode):
    args = ["--quick", "--threads", "1", "--model", "--lds-system", "random-stable"]
    methods = ["stu-futurefill", "lds", "attn-full"]
    records = decode.main([*args, "--attn-prefill-max", "40", "--methods", *methods])
    by_key = {(r["method"], r["prompt_len"]): r for r in records}
    assert by_key["attn-full", 64]["prefill"] == "synthetic" and by_key["attn-full", 64]["prefill_s"] is None
    assert by_key["attn-full", 32]["prefill"] == "real"
    # Two blocks, each a cache of P + 1 entries in 128 slots: a synthetic cache grows like a real one.
    assert by_key["attn-full", 64]["state_mb"] * 2**20 == 2 * (2 * 8 * 128 * 2 * 4)
    assert all(r["ms_per_token"] > 0 for r in records)


@pytest.mark.parametrize("window", [None, 5])
def test_synthetic_cache_has_the_shape_of_a_real_prefill(decode, window):
    layer = build_layer("attn", dim=16, num_heads=4, window_size=window)
    with torch.no_grad():
        real = layer.prefill(torch.randn(2, 11, 16))[1]
    fake = decode.synthetic_state(layer, batch=2, prompt_len=11)
    assert fake.k.shape == real.k.shape and fake.v.shape == real.v.shape and fake.pos == real.pos


def test_decode_rejects_unknown_method(decode):
    with pytest.raises(SystemExit, match="unknown method"):
        decode.main(["--quick", "--threads", "1", "--methods", "stu-slow"])


def test_throughput_quick(throughput, tmp_path):
    out_json, out_png = tmp_path / "tp.json", tmp_path / "tp.png"
    configs = ["stu", "stu_t", "lds", "attn", "attn-window", "model-hybrid"]
    args = ["--quick", "--threads", "1", "--configs", *configs, "--flops", "--peak-tflops", "2"]
    records = throughput.main([*args, "--json", str(out_json), "--plot", str(out_png)])
    assert [(r["config"], r["seq_len"]) for r in records] == [(c, s) for c in configs for s in (64, 128)]
    for r in records:
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["seq_len"] / (r["ms_per_step"] / 1e3))
        assert r["gflop_per_step"] > 0
        assert r["mfu"] == pytest.approx(r["tflops"] / 2)
    assert read_records(out_json) == records
    assert out_png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(("seq_len", "window"), [(1, None), (9, None), (9, 1), (9, 4), (9, 9), (9, 20)])
def test_attended_pairs_counts_the_attention_mask(seq_len, window):
    assert attended_pairs(seq_len, window) == int(window_mask(seq_len, window).sum())


def test_step_flops_of_attention(throughput):
    """Projections: 3 matmuls' worth (forward, input grad, weight grad) of x @ W_qkv and y @ W_o; plus the
    analytic score/value products, 12 * batch * dim per attended pair."""
    batch, seq_len, dim, window = 2, 24, 16, 5
    layer = build_layer("attn", dim=dim, num_heads=4, window_size=window)
    x = torch.randn(batch, seq_len, dim, requires_grad=True)

    def step():
        layer(x).square().mean().backward()

    projections = 3 * (2 * batch * seq_len * dim * 3 * dim + 2 * batch * seq_len * dim * dim)
    attention = 12 * batch * dim * attended_pairs(seq_len, window)
    assert throughput.step_flops(step, layer, batch, seq_len) == projections + attention


def test_tensor_bytes_counts_each_storage_once(common):
    @dataclass
    class State:
        big: torch.Tensor
        views: tuple
        extra: dict

    class Pair(NamedTuple):
        a: torch.Tensor
        b: torch.Tensor

    big = torch.zeros(100)  # 400 bytes; its views add nothing
    pair = Pair(torch.zeros(3, dtype=torch.float64), torch.ones(2))
    extra = {"pair": pair, "list": [torch.zeros(4, dtype=torch.int8)], "n": 3}
    state = State(big, (big[:10], big[50:]), extra)
    assert common.tensor_bytes(state) == 400 + 24 + 8 + 4
    assert common.tensor_bytes([big[:1]]) == 400  # a view keeps its whole storage alive


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="RSS sampling needs /proc")
def test_peak_memory_sees_a_cpu_allocation(common):
    with common.PeakMemory(torch.device("cpu")) as peak:
        held = torch.ones(16 * 2**20)  # 64 MiB, touched
    assert held[-1] == 1 and peak.mb >= 60


def test_format_table_prints_missing_values_as_dash(common):
    table = common.format_table([{"name": "a", "x": 1.5}, {"name": "bb", "x": None}],
                                [("name", "name", "s"), ("x", "x", ".2f")])
    assert table.splitlines() == ["name     x", "a     1.50", "bb       -"]
