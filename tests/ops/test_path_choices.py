"""The CPU path choices are pinned: for a grid of shapes, the STU's arrangement and the LDS's sequence path
on CPU equal the choices the layers made before the cost models moved to `spectralds.ops.costs`.
tests/assets/data/path_choices.json holds them, {"stu": stu_choices(), "lds": lds_choices()} as computed
once on main at 8a613d4 (the code before the move); a change of a CPU choice must be deliberate."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch

from spectralds.layers.lds import make_lds
from spectralds.layers.stu import STU

CHOICES = Path(__file__).parents[1] / "assets" / "data" / "path_choices.json"
CODE = {"kernel": "k", "project": "p", "scan": "s", "conv": "c"}

STU_LAYERS = list(itertools.product([(16, 16), (64, 64), (256, 256), (64, 256), (512, 128)], [8, 24]))
STU_SHAPES = list(itertools.product(
    [1, 2, 8, 32],
    [(T, T) for T in (32, 128, 512, 2048, 8192, 32768)] + [(5, 1024), (100, 8192), (1000, 8192)],
))
LDS_LAYERS = list(itertools.product(
    ["exact", "tensordot"], [True, False], [(16, 16), (64, 64), (256, 256), (64, 128)], [8, 24], [16, 48, 80],
    [32, 64],
))
LDS_SHAPES = list(itertools.product([1, 2, 8], [32, 256, 1024, 4096, 16384], [True, False]))


def stu_choices() -> str:
    codes = []
    for (dim, dim_out), K in STU_LAYERS:
        layer = STU(dim, 64, num_filters=K, dim_out=dim_out, filters=torch.zeros(64, K))
        codes += [CODE[layer._arrangement(batch, steps, length)] for batch, (steps, length) in STU_SHAPES]
    return "".join(codes)


def lds_choices() -> str:
    codes = []
    for mode, learnable, (dim, dim_out), K, h, chunk in LDS_LAYERS:
        torch.manual_seed(0)
        layer = make_lds(dim, None, num_filters=K, state_dim=h, mode=mode, dim_out=dim_out,
                         learnable=learnable, chunk_size=chunk)
        codes += [CODE[layer._sequence_path(batch, T, backward)] for batch, T, backward in LDS_SHAPES]
    return "".join(codes)


def _differences(now: str, before: str, layers: list, shapes: list) -> list[str]:
    grid = list(itertools.product(layers, shapes))
    return [f"{grid[i]}: {before[i]} -> {now[i]}" for i in range(len(before)) if now[i] != before[i]]


def test_the_stu_arrangement_on_cpu_is_unchanged():
    before = json.loads(CHOICES.read_text())["stu"]
    now = stu_choices()
    assert len(now) == len(before) and set(before) == {"k", "p"}  # the grid sees both arrangements
    assert now == before, _differences(now, before, STU_LAYERS, STU_SHAPES)[:10]


def test_the_lds_path_on_cpu_is_unchanged():
    before = json.loads(CHOICES.read_text())["lds"]
    now = lds_choices()
    assert len(now) == len(before) and set(before) == {"k", "p", "s", "c"}
    assert now == before, _differences(now, before, LDS_LAYERS, LDS_SHAPES)[:10]

