"""Training telemetry: the FLOPs count behind the throughput figures, and the callbacks the models add by
default (token throughput, `spectralds.callbacks.TokenThroughput`, and one learning-rate curve)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ThroughputMonitor
from torch import nn

from spectralds.callbacks.throughput import TokenThroughput
from spectralds.layers.registry import SequenceLayer

LR_CURVE = "train/lr"  # LearningRateMonitor logs the scheduler under its config's "name"


def forward_flops(module: nn.Module, batch: int, seq_len: int) -> float:
    """Forward FLOPs of `module` on a (batch, seq_len) input; training counts 3x this (backward ~ twice
    the forward, see `train_flops` in `spectralds.models.common`).

    Every sequence layer whose `SequenceLayer.forward_flops` knows its cost reports the path it takes
    for that shape: the STU's chosen arrangement ("kernel" or "project"), STU-T's projection, kernel mix,
    FFTs and products, the LDS scan or convolution (with a learnable system's rebuilt response), attention's
    QK^T and AV over the keys each query sees, all counted by `spectralds.ops.costs` in one convention
    (2 per real multiply-add, FFTs 2.5 n log2 n per real FFT of length n; see that module). Every other
    weight with 2 or more dimensions (linear layers, the attention projections, AR terms, a layer that
    reports None) counts 2 FLOPs (multiply + add) per token per element, except embedding tables (a
    lookup; a tied head counts once, as a linear layer). A parameter its layer reports is never counted
    again. Not counted: norms, activations and other elementwise work.
    """
    reported, claimed = 0.0, set()
    for m in module.modules():
        flops = m.forward_flops(batch, seq_len) if isinstance(m, SequenceLayer) else None
        if flops is not None:
            reported += flops
            claimed.update(id(p) for p in m.parameters(recurse=False))  # submodules: own report or the rule
    tables = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    weights: dict[int, int] = {}
    for m in module.modules():
        for p in m.parameters(recurse=False):
            if p.dim() >= 2:
                weights[id(p)] = p.numel()
        if isinstance(m, nn.Linear):
            tables.discard(id(m.weight))  # a tied head multiplies by the embedding table
    generic = sum(n for key, n in weights.items() if key not in tables and key not in claimed)
    return reported + 2 * batch * seq_len * generic


def flops_per_token(module: nn.Module, seq_len: int, batch: int = 1) -> float:
    """`forward_flops` per token (it depends on the batch: the STU's kernel arrangement builds W(f) once)."""
    return forward_flops(module, batch, seq_len) / (batch * seq_len)


def default_callbacks(trainer: L.Trainer | None) -> list[Callback]:
    """A LearningRateMonitor and a TokenThroughput, each unless the trainer already has one (or no logger)."""
    if trainer is None or not trainer.loggers:
        return []
    present = trainer.callbacks
    callbacks: list[Callback] = []
    if not any(isinstance(c, LearningRateMonitor) for c in present):
        callbacks.append(LearningRateMonitor())
    if not any(isinstance(c, (TokenThroughput, ThroughputMonitor)) for c in present):
        callbacks.append(TokenThroughput())
    return callbacks
