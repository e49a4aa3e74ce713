"""`spectralds.ops.costs`: the CUDA path rule (fewest counted FLOPs, "project" only within its memory bound)
and the path as a constructor argument kept in the layer spec. The CPU rule is pinned by
tests/ops/test_path_choices.py; the counts themselves by tests/models/test_telemetry.py."""

from __future__ import annotations

import pytest
import torch

from spectralds.errors import UserError
from spectralds.layers import build_layer, layer_spec, restore_layers
from spectralds.layers.stu import STU
from spectralds.ops import costs
from spectralds.ops.costs import LDSShape, conv_flops, lds_flops, lds_path, stu_arrangement

STU_SHAPES = [(b, T, d, K) for b in (1, 8, 64) for T in (64, 1024, 8192) for d in (16, 256) for K in (8, 24)]


@pytest.mark.parametrize(("batch", "T", "dim", "K"), STU_SHAPES)
def test_cuda_takes_the_stu_arrangement_of_fewest_counted_flops(batch, T, dim, K, monkeypatch):
    monkeypatch.setattr(costs, "CUDA_PROJECT_BYTES", float("inf"))  # no memory bound here
    counts = {a: conv_flops(batch, T, T, 2 * K, dim, dim, a) for a in ("kernel", "project")}
    assert stu_arrangement("cuda", "auto", batch, T, T, 2 * K, dim, dim) == min(counts, key=counts.get)


def test_cuda_rule_differs_from_the_one_thread_cpu_rule_somewhere():
    """The device type is read: over the grid some shapes are chosen differently (the CPU weights count
    FFTs and matmuls apart, the CUDA rule counts FLOPs)."""
    chosen = {dev: [stu_arrangement(dev, "auto", b, T, T, 2 * K, d, d) for b, T, d, K in STU_SHAPES]
              for dev in ("cpu", "cuda", "mps")}
    assert chosen["cpu"] != chosen["cuda"]
    assert chosen["cpu"] == chosen["mps"]  # every device type but CUDA keeps the measured CPU rule


def test_cuda_refuses_a_project_arrangement_past_its_memory_bound(monkeypatch):
    batch, T, cols, dim = 1, 1024, 16, 256  # "project" has fewer FLOPs at batch 1
    counts = [conv_flops(batch, T, T, cols, dim, dim, a) for a in ("project", "kernel")]
    assert counts[0] < counts[1]
    spectra = 8 * batch * cols * dim * (2048 // 2 + 1)  # complex64 (batch, 2K, dim_out, n // 2 + 1)
    monkeypatch.setattr(costs, "CUDA_PROJECT_BYTES", spectra)
    assert stu_arrangement("cuda", "auto", batch, T, T, cols, dim, dim) == "project"
    monkeypatch.setattr(costs, "CUDA_PROJECT_BYTES", spectra - 1)
    assert stu_arrangement("cuda", "auto", batch, T, T, cols, dim, dim) == "kernel"
    assert stu_arrangement("cuda", "project", batch, T, T, cols, dim, dim) == "project"  # pinned: as asked


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("learnable", [True, False])
@pytest.mark.parametrize(("batch", "T"), [(1, 256), (1, 8192), (8, 1024), (8, 16384)])
def test_cuda_takes_the_lds_path_of_fewest_counted_flops(exact, learnable, batch, T, monkeypatch):
    monkeypatch.setattr(costs, "CUDA_PROJECT_BYTES", float("inf"))
    shape = LDSShape(dim=64, dim_out=64, cols=48, h=48, chunk=64, exact=exact, learnable=learnable)
    convs = ("kernel", "project") if exact else ("conv",)
    counts = {p: lds_flops(shape, batch, T, p) for p in (*convs, "scan")}
    for backward in (True, False):  # the CUDA rule does not weigh a backward
        assert lds_path("cuda", shape, "auto", batch, T, backward) == min(counts, key=counts.get)
    conv_counts = {p: counts[p] for p in convs}
    assert lds_path("cuda", shape, "conv", batch, T, True) == min(conv_counts, key=conv_counts.get)
    assert lds_path("cuda", shape, "scan", batch, T, True) == "scan"


def test_the_stu_path_is_an_argument_kept_in_the_spec():
    layer = build_layer("stu", dim=4, seq_len=16, num_filters=2, conv_path="project")
    assert layer.conv_path == "project" and layer_spec(layer)["conv_path"] == "project"
    assert "conv_path=" in repr(layer)
    layer.conv_path = "kernel"  # on an instance (the same weights, another path): the spec follows
    assert layer_spec(layer)["conv_path"] == "kernel"
    holder = torch.nn.ModuleDict({"mixer": build_layer("stu", dim=4, seq_len=16, num_filters=2)})
    assert "conv_path" not in layer_spec(holder["mixer"])  # "auto": the spec as before the argument
    assert restore_layers(holder, {"mixer": layer_spec(layer)}) == ["mixer"]
    assert holder["mixer"].conv_path == "kernel"
    assert layer_spec(STU(4, 16, num_filters=2, conv_path="kernel")) is None  # not built by the registry
    with pytest.raises(UserError, match="STU conv_path"):
        build_layer("stu", dim=4, seq_len=16, num_filters=2, conv_path="scan")
    with pytest.raises(UserError, match="STU conv_path"):
        layer.conv_path = "conv"


@pytest.mark.parametrize("mode", ["exact", "tensordot"])
def test_the_lds_path_is_an_argument_kept_in_the_spec(mode):
    layer = build_layer("lds", dim=4, seq_len=16, num_filters=2, state_dim=3, mode=mode, conv_path="scan")
    assert layer.spec()["conv_path"] == "scan" and layer._sequence_path(8, 16) == "scan"
    holder = torch.nn.ModuleDict({"mixer": build_layer("lds", dim=4, num_filters=2, state_dim=3, mode=mode)})
    assert "conv_path" not in holder["mixer"].spec()
    assert restore_layers(holder, {"mixer": layer.spec()}) == ["mixer"]
    assert holder["mixer"].conv_path == "scan" and holder["mixer"].spec() == layer.spec()
