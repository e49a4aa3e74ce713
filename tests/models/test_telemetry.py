"""FLOPs telemetry: each spectral layer reports the path it takes; the model total adds the generic rule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from spectralds.layers.attention import SlidingWindowAttention
from spectralds.layers.lds import LDS, make_lds
from spectralds.layers.registry import SequenceLayer
from spectralds.layers.stu import STU, STUTensordot
from spectralds.models.telemetry import flops_per_token, forward_flops

B, T, DIM, K, H, CHUNK = 2, 8, 4, 2, 3, 4
N = 16  # FFT length: the smallest power of two >= 2 T - 1
FREQS, FFT = N // 2 + 1, 2.5 * N * math.log2(N)  # rfft bins; one real FFT's FLOPs
COLS, DD = 2 * K, DIM * DIM


def stu_kernel() -> float:  # W(f) from the filter spectra (re + im), a complex matmul per f, FFTs in and out
    return 2 * 2 * FREQS * COLS * DD + 8 * B * FREQS * DD + B * 2 * DIM * FFT


def stu_project() -> float:  # x @ M, an FFT per (filter, channel), complex multiply-adds, inverse FFTs
    return B * (2 * T * COLS * DD + COLS * DIM * FFT + 8 * COLS * DIM * FREQS + DIM * FFT)


def stu_t() -> float:  # x @ M_inputs, kernel spectra mixed, an FFT in and out per channel, complex products
    return 2 * B * T * DD + 2 * 2 * FREQS * COLS * DIM + B * DIM * (2 * FFT + 6 * FREQS)


def tiny(cls, **kw):
    torch.manual_seed(0)
    return cls(DIM, 16, num_filters=K, **kw)


@pytest.mark.parametrize("path", ["kernel", "project", "auto"])
def test_stu_reports_the_arrangement_it_takes(path):
    layer = tiny(STU, conv_path=path)
    chosen = path if path != "auto" else layer._arrangement(B, T, T)
    expected = {"kernel": stu_kernel(), "project": stu_project()}[chosen]
    assert layer.forward_flops(B, T) == pytest.approx(expected)
    assert forward_flops(layer, B, T) == layer.forward_flops(B, T)  # M is not counted again per token


def test_stu_auto_picks_by_the_layer_estimate():
    layer = tiny(STU)
    for batch in (1, 64):
        layer.conv_path = layer._arrangement(batch, T, T)  # the same weights, pinned
        pinned = layer.forward_flops(batch, T)
        layer.conv_path = "auto"
        assert layer.forward_flops(batch, T) == pinned


def test_stu_t_reports_its_tensordot_path():
    layer = tiny(STUTensordot)
    assert layer.forward_flops(B, T) == pytest.approx(stu_t())
    assert forward_flops(layer, B, T) == layer.forward_flops(B, T)


def test_ar_terms_are_counted_by_the_generic_rule():
    layer = tiny(STU, ar_order=2)
    ar = 2 * B * T * (layer.ar.M_u.numel() + layer.ar.M_y.numel())
    assert forward_flops(layer, B, T) == pytest.approx(layer.forward_flops(B, T) + ar)


def lds(mode: str, learnable: bool, path: str) -> LDS:
    torch.manual_seed(0)
    return make_lds(DIM, 16, num_filters=K, state_dim=H, mode=mode, learnable=learnable, chunk_size=CHUNK,
                    conv_path=path)


def scan(channels: int, F: int, groups: int) -> float:
    tables = 3 * groups * CHUNK * H * F
    # T // CHUNK = 2 chunks: their final states (T steps of h), one chunk end updated by the combine
    return tables + 2 * B * channels * H * (T + 1) + 2 * B * channels * T * (CHUNK + H) * F


RESPONSE = T * H + 2 * T * H * COLS + COLS * FFT  # G = (A^t B) @ C for a learnable system, and its FFTs
FOLDED = T * H + 2 * T * H * DIM + DIM * FFT  # tensordot: one response column per channel


@pytest.mark.parametrize(
    ("mode", "learnable", "path", "expected"),
    [
        ("exact", True, "scan", lambda: scan(DIM, COLS, 1) + 2 * B * T * COLS * DD),
        ("exact", False, "scan", lambda: scan(DIM, COLS, 1) + 2 * B * T * COLS * DD),
        ("exact", True, "kernel", lambda: stu_kernel() + RESPONSE),
        ("exact", False, "kernel", stu_kernel),  # a fitted spectrum is cached
        ("exact", True, "project", lambda: stu_project() + RESPONSE),
        ("exact", False, "project", stu_project),
        # tensordot: x @ M_inputs and M_filters folded into C, then one readout per channel (F = 1)
        ("tensordot", True, "scan", lambda: scan(DIM, 1, DIM) + 2 * B * T * DD + 2 * H * COLS * DIM),
        ("tensordot", False, "conv", stu_t),
        (
            "tensordot",
            True,
            "conv",  # folded readout: one response column per channel, no spectrum mix
            lambda: stu_t() - 4 * FREQS * COLS * DIM + 2 * H * COLS * DIM + FOLDED,
        ),
    ],
)
def test_lds_reports_its_path(mode, learnable, path, expected):
    layer = lds(mode, learnable, path)
    assert layer._sequence_path(B, T) == path
    assert layer.forward_flops(B, T) == pytest.approx(expected())
    assert forward_flops(layer, B, T) == layer.forward_flops(B, T)  # M, B, C are not counted again


def test_lds_auto_reports_the_chosen_path():
    layer = lds("exact", True, "auto")
    chosen = layer._sequence_path(B, T)
    pinned = lds("exact", True, chosen).forward_flops(B, T)
    assert layer.forward_flops(B, T) == pinned


def test_attention_reports_qk_and_av_over_its_window():
    layer = SlidingWindowAttention(8, num_heads=2, window_size=4)
    seen = sum(min(t + 1, 4) for t in range(T))
    assert layer.forward_flops(B, T) == 2 * 2 * B * 8 * seen
    projections = 2 * B * T * (layer.qkv.weight.numel() + layer.o_proj.weight.numel())
    assert forward_flops(layer, B, T) == layer.forward_flops(B, T) + projections


class _Unknown(SequenceLayer):
    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.zeros(DIM, DIM))


def test_a_layer_without_a_report_falls_back_to_the_weight_rule():
    assert _Unknown().forward_flops(B, T) is None
    assert forward_flops(_Unknown(), B, T) == 2 * B * T * DD
    assert flops_per_token(_Unknown(), T, batch=B) == 2 * DD
