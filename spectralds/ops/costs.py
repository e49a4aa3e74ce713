"""What the sequence ops cost ("count") and which path a layer takes for a shape ("choose"), kept apart.

Count: the FLOPs telemetry reports (`spectralds.models.telemetry.forward_flops`); every layer's
`forward_flops` is one of these. One convention: 2 FLOPs per real multiply-add (a matmul is 2 m n k), 8 per
complex multiply-add, 6 per complex product, and `fft_flops(n)` = 2.5 n log2 n per real FFT or inverse FFT
of length n. Fixed spectra (a filter bank, a fitted system) are cached, so not counted; elementwise casts
and copies are not counted.
  fft_flops(n)                      one real FFT
  conv_flops(..., arrangement)      a spectral convolution: "kernel", "project" (STU), "depthwise" (STU-T)
  scan_flops(...)                   `ops.lds_scan.scan`
  lds_flops(shape, batch, T, path)  an LDS layer's `forward` along `path`, its readouts included
  attention_flops(...)              QK^T and AV over the attended pairs (`attended_pairs`)

Choose: the path of a layer for a shape on a device type, when its `conv_path` is "auto".
  stu_arrangement(device_type, conv_path, ...)   "kernel" or "project"
  lds_path(device_type, shape, conv_path, ...)   "scan", "kernel", "project" (exact) or "conv" (tensordot)
* CPU (and every device type but CUDA): relative time estimates measured with one thread (`_cpu_*`,
  the SCAN_* weights). They are not FLOP counts: each weighs its terms by what they cost there.
* CUDA: the fewest counted FLOPs (the "count" functions above), except that "project" is not taken when its
  spectra, the largest tensor it keeps for backward, would exceed CUDA_PROJECT_BYTES. Why so simple: the
  CPU weights (matmul vs FFT speed of one thread) have no meaning on a GPU, and no GPU timing has been
  made to fit others; FLOPs are the device-neutral first guess, and memory is the other limit there.
  The one GPU measurement at hand (tools/results/h100/stu_path_*.json: STU dim 512, K 24, batch 8, L 1k-8k,
  bf16): this rule takes "kernel" there (a third of the counted FLOPs; "project"'s spectra, 1.5-12 GiB,
  are past the bound), which ran 3-17% slower than "project" at 1/4-1/30 of its peak memory. FLOPs alone
  misjudge the memory-bound kernel path; no other GPU shape has been measured to fit a better rule.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from spectralds.errors import check_choice
from spectralds.ops.fft_conv import fft_size

STU_PATHS = ("auto", "kernel", "project")
LDS_PATHS = ("auto", "scan", "conv", "kernel", "project")
# Time per estimated flop of the scan relative to the FFT convolutions, measured on CPU (one thread,
# dim 64, K 24, h 48-80, L 1k-4k, fwd+bwd). With one readout shared by all channels (exact mode) the
# scan is one large matmul and runs ~4x more flops per second than the memory-bound FFT paths; with a
# readout per channel (tensordot) it is many small matmuls plus table building, ~2.5x fewer.
SCAN_WEIGHT_SHARED = 0.25
SCAN_WEIGHT_PER_CHANNEL = 2.5
# Forward only (inference, prefill): without a backward through its tables, the per-channel scan runs
# about as many flops per second as the convolution, plus a fixed ~1.3 ms for its tables at dim 64
# (measured, one thread, h 48: it wins at 4k-8k for batch 1, the convolution at 256-1k and at batch 8).
SCAN_WEIGHT_PER_CHANNEL_FORWARD = 1.0
SCAN_TABLES_FORWARD = 12e6
# CUDA: the "project" arrangement's spectra (batch, 2K, dim_out, n // 2 + 1) complex64 are kept for
# backward; past this size the "kernel" arrangement, which builds W(f) a chunk at a time, is taken.
CUDA_PROJECT_BYTES = 1 << 30


class LDSShape(NamedTuple):
    """What an LDS layer's costs depend on besides the input shape (`LDS.cost_shape()`)."""

    dim: int
    dim_out: int
    cols: int  # 2K, the system's outputs
    h: int  # states
    chunk: int  # the scan's chunk length
    exact: bool  # one readout shared by every channel (exact) or one per channel (tensordot)
    learnable: bool  # the response is rebuilt every step (a fitted system's spectrum is cached)


# ---- count -------------------------------------------------------------------------------------------


def fft_flops(n: int) -> float:
    """The usual estimate of one length-n real FFT (or inverse): 2.5 n log2 n (half a complex FFT's)."""
    return 2.5 * n * math.log2(n)


def conv_flops(
    batch: int, steps: int, length: int, cols: int, dim: int, dim_out: int, arrangement: str
) -> float:
    """A spectral convolution of `cols` filters, inputs at `steps` positions, outputs at `length`:
    "kernel" / "project" (STU, a fitted exact LDS) or "depthwise" (STU-T: x @ M_inputs, the per-channel
    kernel spectra mixed from the cached filter spectra, one product each)."""
    n = fft_size(steps + length - 1)
    freqs, dd, fft = n // 2 + 1, dim * dim_out, fft_flops(n)
    if arrangement == "kernel":  # W(f) = S_re M + i S_im M, (B, dim) @ W(f) per f; dim FFTs in, dim_out out
        return 4 * freqs * cols * dd + 8 * batch * freqs * dd + batch * (dim + dim_out) * fft
    if arrangement == "project":  # x @ M, an FFT per (filter, channel), filter_sum, dim_out inverse FFTs
        return batch * (2 * steps * cols * dd + cols * dim_out * (fft + 8 * freqs) + dim_out * fft)
    if arrangement == "depthwise":
        mix = 4 * freqs * cols * dim_out  # [S_re; S_im] (2 F, 2K) @ (2K, dim_out)
        return mix + batch * (2 * steps * dd + dim_out * (2 * fft + 6 * freqs))
    raise ValueError(f"unknown arrangement {arrangement!r}")


def scan_flops(batch: int, T: int, ch: int, h: int, chunk: int, F: int, groups: int) -> float:
    """`ops.lds_scan.scan` (unweighted): its tables for `groups` readouts, each chunk's final state, the
    log-depth combine of chunk ends and the (chunk + h, chunk F) matmul per chunk and channel."""
    n = -(-T // chunk)  # chunks, after left padding
    combined = sum(n - (1 << i) for i in range(max(n - 1, 0).bit_length()))  # ends updated per doubling
    tables = 3 * groups * chunk * h * F  # the Toeplitz kernel (a matmul) and the state response (a product)
    return tables + 2 * batch * ch * h * (n * chunk + combined) + 2 * batch * ch * n * chunk * (chunk + h) * F


def lds_flops(shape: LDSShape, batch: int, T: int, path: str) -> float:
    """An LDS layer's `forward` along `path`: the scan and its readouts (exact: the projection of every
    filter's features; tensordot: x @ M_inputs and M_filters folded into C), or the convolution (the
    STU's arrangements plus, for a learnable system, the response G = (A^t B) @ C and its FFTs)."""
    s, proj = shape, 2 * batch * T * shape.dim * shape.dim_out
    if path == "scan" and s.exact:
        return scan_flops(batch, T, s.dim, s.h, s.chunk, s.cols, 1) + s.cols * proj
    if path == "scan":
        fold = 2 * s.h * s.cols * s.dim_out
        return scan_flops(batch, T, s.dim_out, s.h, s.chunk, 1, s.dim_out) + proj + fold
    n = fft_size(2 * T - 1)
    if s.exact:
        response = T * s.h + 2 * T * s.h * s.cols + s.cols * fft_flops(n) if s.learnable else 0.0
        return conv_flops(batch, T, T, s.cols, s.dim, s.dim_out, path) + response
    depthwise = conv_flops(batch, T, T, s.cols, s.dim, s.dim_out, "depthwise")  # mixes a cached spectrum
    if not s.learnable:
        return depthwise
    mix, fold = 4 * (n // 2 + 1) * s.cols * s.dim_out, 2 * s.h * s.cols * s.dim_out  # fold M_filters into C
    return depthwise - mix + fold + T * s.h + 2 * T * s.h * s.dim_out + s.dim_out * fft_flops(n)


def attended_pairs(seq_len: int, window: int | None) -> int:
    """Query-key pairs of causal attention: sum over t of min(t + 1, window) (None: no window)."""
    if window is None or window >= seq_len:
        return seq_len * (seq_len + 1) // 2
    return window * (window + 1) // 2 + (seq_len - window) * window


def attention_flops(batch: int, seq_len: int, dim: int, window: int | None) -> float:
    """QK^T and AV of causal attention over the pairs each query sees: 2 dim multiply-adds per pair."""
    return 2 * 2 * batch * dim * attended_pairs(seq_len, window)


# ---- choose ------------------------------------------------------------------------------------------


def conv_path_property(layer: str, choices: tuple[str, ...]) -> property:
    """A layer's `conv_path`, a constructor argument kept in its spec; assigning it on an instance (to
    compare paths on the same weights, or pin one in a benchmark) is checked against `choices`."""

    def get(self) -> str:
        return self._conv_path

    def set_(self, path: str) -> None:
        self._conv_path = check_choice(f"{layer} conv_path", path, choices)

    return property(get, set_, doc=f"The {layer}'s sequence path, one of {choices} (auto: chosen per shape).")


def stu_arrangement(
    device_type: str, conv_path: str, batch: int, steps: int, length: int, cols: int, dim: int, dim_out: int
) -> str:
    """The STU's arrangement for inputs at `steps` positions and outputs at `length`: `conv_path` when
    pinned, else by the rule of `device_type` (module docstring)."""
    if conv_path != "auto":
        return conv_path
    if device_type == "cuda":
        counts = {a: conv_flops(batch, steps, length, cols, dim, dim_out, a) for a in ("kernel", "project")}
        return _fewest(counts, _project_fits(batch, steps + length - 1, cols, dim_out))
    kernel, project = _cpu_arrangements(batch, steps, length, cols, dim, dim_out)
    return "kernel" if kernel < project else "project"


def lds_path(device_type: str, shape: LDSShape, conv_path: str, batch: int, T: int, backward: bool) -> str:
    """An LDS layer's path: `conv_path` when pinned ("scan"; "kernel" / "project", which a tensordot layer
    reads as "conv"), the cheaper convolution for "conv", the cheapest of all for "auto", by the rule of
    `device_type`. `backward`: the estimates of a training step, or of a forward alone (CPU only: on
    CUDA every path's backward is counted as about twice its forward)."""
    if conv_path in ("kernel", "project"):
        return conv_path if shape.exact else "conv"
    if conv_path == "scan":
        return conv_path
    if device_type == "cuda":
        paths = ("kernel", "project") if shape.exact else ("conv",)
        counts = {p: lds_flops(shape, batch, T, p) for p in paths + ("scan",) * (conv_path == "auto")}
        return _fewest(counts, _project_fits(batch, 2 * T - 1, shape.cols, shape.dim_out))
    costs = _cpu_lds_convs(shape, batch, T)
    best = min(costs, key=costs.get)
    return best if conv_path == "conv" or costs[best] <= _cpu_scan(shape, batch, T, backward) else "scan"


def _fewest(counts: dict[str, float], project_fits: bool) -> str:
    """The path of fewest counted FLOPs (ties: the first), "project" only when its spectra fit."""
    if not project_fits:
        counts.pop("project", None)  # "kernel" is there whenever "project" is
    return min(counts, key=counts.get)


def _project_fits(batch: int, span: int, cols: int, dim_out: int) -> bool:
    """Whether the "project" spectra, (batch, cols, dim_out, n // 2 + 1) complex64, fit CUDA_PROJECT_BYTES."""
    return 8 * batch * cols * dim_out * (fft_size(span) // 2 + 1) <= CUDA_PROJECT_BYTES


def _cpu_arrangements(
    batch: int, steps: int, length: int, cols: int, dim: int, dim_out: int
) -> tuple[float, float]:
    """CPU estimates of the two exact arrangements of a 2K-filter convolution mixed by M ("kernel": build
    W(f), then a matmul per frequency; "project": x @ M, then one FFT per filter and output channel)."""
    n = fft_size(steps + length - 1)
    freqs, dd = n // 2 + 1, dim * dim_out
    kernel = 2 * freqs * cols * dd + 4 * batch * freqs * dd  # build W(f), then B matmuls per f
    project = batch * (steps * cols * dd + cols * dim_out * (fft_flops(n) + 4 * freqs))
    return kernel, project


def _cpu_scan(shape: LDSShape, batch: int, T: int, backward: bool) -> float:
    """CPU estimate of the chunked scan: a (chunk + h, chunk F) matmul per chunk and channel (exact: then
    the projection per token), weighted by SCAN_WEIGHT_SHARED (exact: one readout C for all channels)
    or the per-channel weights (tensordot; `backward=False`: the forward-only ones)."""
    s = shape
    if s.exact:
        project = 2 * s.cols * s.dim * s.dim_out
        return SCAN_WEIGHT_SHARED * (2 * batch * T * s.dim * (s.chunk + s.h) * s.cols + batch * T * project)
    flops = 2 * batch * T * s.dim_out * (s.chunk + s.h)  # one readout column (F = 1), no projection
    if backward:
        return SCAN_WEIGHT_PER_CHANNEL * flops
    return SCAN_WEIGHT_PER_CHANNEL_FORWARD * flops + SCAN_TABLES_FORWARD * s.dim_out / 64


def _cpu_lds_convs(shape: LDSShape, batch: int, T: int) -> dict[str, float]:
    """CPU estimates of each convolution arrangement ("kernel", "project" for the exact mode, "conv" for
    tensordot), the response spectrum included when it is rebuilt (learnable)."""
    s, n = shape, fft_size(2 * T - 1)
    freqs = n // 2 + 1
    if s.exact:
        response = (2 * T * s.h * s.cols + s.cols * fft_flops(n)) if s.learnable else 0.0
        kernel, project = _cpu_arrangements(batch, T, T, s.cols, s.dim, s.dim_out)
        return {"kernel": kernel + response, "project": project + response}
    # tensordot: a learnable system's folded response, one column per channel; a fixed one's cached
    # spectrum mixed by M_filters
    folded, mixed = 2 * T * s.h * s.dim_out + s.dim_out * fft_flops(n), 4 * freqs * s.cols * s.dim_out
    extra = folded if s.learnable else mixed
    return {"conv": batch * s.dim_out * (2 * fft_flops(n) + 6 * freqs) + extra}
