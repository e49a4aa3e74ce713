"""STU -> LDS conversion: every STU layer becomes an LDS layer with the same learned M.

The LDS (shared A, B, C from one filter fit) reproduces the 2K spectral filters, so the converted
layer computes the STU's function up to the fit error. Layers are found by type, so this works on
any module that holds registry-built STU layers, not only on our models.

Measured, not claimed: `convert_stu_layers` measures every converted layer against the STU it replaces
(never the fit file's metadata) with two numbers, `filter_rel_mse` (the LDS impulse response against
the layer's own filter buffer, column order and signs included) and `layer_error` (the LDS layer's
output against the STU layer's on a fixed probe input), and the converted layer as it runs with a
third, `run_rel_mse`: its forward and its decoding (prefill, then one step per token) in the dtype its
state runs in, against its own float64 forward (`spectralds.distill.run_precision`): a fit exact in
float64 can decode badly in float32. With `max_error` it refuses, before any layer is swapped, when any
of them is above it. The probe runs batch 1 on a few channels (FFT convolution for the STU, the chunked
scan or a convolution for the LDS, 3/4 of it decoded step by step).
Each measured LDS is dropped before the next is built and rebuilt, the same way, at the swap: the
conversion holds one layer more than the module, not a second copy of every converted layer.

A layer that carries its own filter bank (`store_filters`, e.g. a source's, whose columns may differ
from ours in order and sign) gets the fit's columns matched to its bank by measurement
(`spectralds.distill.bank_match`), or a one-line refusal.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from spectralds.distill.bank_match import fit_for_bank
from spectralds.distill.lds_file import LDSFit
from spectralds.distill.measure import output_rel_mse, relative_mse, target_filters
from spectralds.distill.run_precision import rebuilt, run_error
from spectralds.errors import UserError, UserTypeError
from spectralds.layers import build_layer
from spectralds.layers.lds import LDS
from spectralds.layers.stu import STU, STUTensordot

STU_TYPES = (STU, STUTensordot)
PROBE_CHANNELS = 4  # input and output channels of the probe: its cost does not grow with the width
PROBE_SEED = 0


def check_fit_matches(stu: nn.Module, fit: LDSFit) -> None:
    """The fit must cover the layer's context and use its filters (count and variant)."""
    if stu.seq_len > fit.seq_len:
        raise UserError(
            f"the STU layer's seq_len {stu.seq_len} is longer than the fitted LDS's seq_len {fit.seq_len}"
        )
    if stu.num_filters != fit.num_filters or stu.variant != fit.variant:
        raise UserError(
            f"the LDS was fitted to {fit.num_filters} {fit.variant!r} filters, the STU layer uses "
            f"{stu.num_filters} {stu.variant!r} filters"
        )


def lds_from_stu(stu: nn.Module, fit: LDSFit) -> LDS:
    """An LDS layer computing `stu`'s function: the fitted system plus the STU's own projections."""
    if not isinstance(stu, STU_TYPES):
        raise UserTypeError(f"expected an STU or STU-T layer, got {type(stu).__name__}")
    check_fit_matches(stu, fit)
    fit = fit_for_bank(stu, fit)  # a bank the layer carries: the fit's columns matched to it, or refused
    tensordot = isinstance(stu, STUTensordot)
    # AR terms (spectralds.layers.ar) are not part of the convolution: carried over unchanged.
    ar = {"ar_order": stu.ar.order} if stu.ar is not None else {}
    # A float64 STU distills to a float64 LDS (the scan's run dtype), any other to float32.
    dtype = torch.float64 if next(stu.parameters()).dtype == torch.float64 else torch.float32
    lds = build_layer(
        "lds_ar" if ar else "lds",
        dim=stu.dim,
        dim_out=stu.dim_out,
        seq_len=stu.seq_len,
        num_filters=stu.num_filters,
        state_dim=fit.state_dim,
        mode="tensordot" if tensordot else "exact",
        learnable=False,
        **({"dtype": "float64"} if dtype == torch.float64 else {}),
        **ar,
    )
    lds.set_system(fit.A, fit.B, fit.C, learnable=False)
    with torch.no_grad():  # the STU's projections have the same names
        for name in lds.projection_names():
            lds.get_parameter(name).copy_(stu.get_parameter(name))
    return lds.to(next(stu.parameters()).device)


@dataclass
class LayerReport:
    """How well one converted layer reproduces its STU (relative MSEs, measured at conversion):
    `rel_mse` of the outputs on the probe input, `filter_rel_mse` of the impulse response against the
    layer's filters, `run_rel_mse` of the LDS's forward and decoding in `run_dtype` (the dtype its state
    runs in) against its own float64 forward (`spectralds.distill.run_precision`)."""

    path: str
    kind: str
    state_dim: int
    rel_mse: float
    filter_rel_mse: float = float("nan")
    run_rel_mse: float = float("nan")
    run_dtype: str = "float32"

    @property
    def worst(self) -> float:
        """The largest of the measured errors (NaN if any is): what `max_fit_error` is compared with."""
        errors = (self.rel_mse, self.filter_rel_mse, self.run_rel_mse)
        return math.nan if any(math.isnan(e) for e in errors) else max(errors)


def find_stu_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(path, sub) for path, sub in module.named_modules() if isinstance(sub, STU_TYPES)]


@torch.no_grad()
def filter_rel_mse(stu: nn.Module, lds: LDS) -> float:
    """Relative MSE of the LDS's 2K impulse responses against [phi, (-1)^t phi] of the STU's buffer."""
    phi = stu.phi.detach().to(torch.float64)
    return float(relative_mse(lds.impulse_response(stu.seq_len).to(phi.device), target_filters(phi)))


def _spread(n: int, count: int) -> torch.Tensor:
    """`count` channel indices spread over 0..n-1 (first and last included)."""
    return torch.linspace(0, n - 1, min(n, count)).round().long().unique()


@torch.no_grad()
def _probe_pair(stu: nn.Module, lds: LDS, channels: int) -> tuple[nn.Module, LDS, int]:
    """Copies of `stu` and `lds` restricted to a few input and output channels: the same function as the
    full layers on inputs that are zero outside those channels, read on those outputs."""
    cin, cout = _spread(stu.dim, channels), _spread(stu.dim_out, channels)
    dims = {"dim": cin.numel(), "dim_out": cout.numel(), "seq_len": stu.seq_len,
            "num_filters": stu.num_filters}
    kind = "stu_t" if isinstance(stu, STUTensordot) else "stu"
    ar = {"ar_order": stu.ar.order} if stu.ar is not None else {}
    small_stu = build_layer(kind, variant=stu.variant, filters=stu.phi.cpu(), **dims, **ar)
    small_lds = build_layer("lds_ar" if ar else "lds", state_dim=lds.state_dim, mode=lds.mode,
                            learnable=False, **dims, **ar)
    small_lds.set_system(*(p.detach().cpu() for p in lds.system()), learnable=False)
    channels_of = {"in": cin, "out": cout}

    def pick(m: torch.Tensor, axes: tuple[str, ...]) -> torch.Tensor:
        # ar.M_y: outputs feed back only through the kept channels, in both small layers alike
        for axis, role in enumerate(axes):
            m = m.index_select(axis, channels_of[role]) if role else m
        return m

    for small, big in ((small_stu, stu), (small_lds, lds)):
        for name, axes in lds.projection_axes().items():
            small.get_parameter(name).copy_(pick(big.get_parameter(name).detach().cpu(), axes))
    device = stu.phi.device
    return small_stu.to(device), small_lds.to(device), cin.numel()


@torch.no_grad()
def layer_error(stu: nn.Module, lds: LDS, seed: int = PROBE_SEED, channels: int = PROBE_CHANNELS) -> float:
    """Relative MSE of the LDS output against the STU output on a fixed random probe input of full length
    (batch 1, `channels` input and output channels spread over the width; see `_probe_pair`)."""
    return layer_errors(stu, lds, seed, channels)[0]


@torch.no_grad()
def layer_errors(
    stu: nn.Module, lds: LDS, seed: int = PROBE_SEED, channels: int = PROBE_CHANNELS
) -> tuple[float, float]:
    """`layer_error`, and the probe LDS's `run_precision.run_error` (its forward and its decoding in its
    run dtype against its own float64 forward) on the same probe input."""
    small_stu, small_lds, width = _probe_pair(stu, lds, channels)
    x = torch.randn(1, stu.seq_len, width, generator=torch.Generator().manual_seed(seed)).to(stu.phi.device)
    error = output_rel_mse(small_lds(x), small_stu(x))
    return error, run_error(rebuilt(small_lds, lds.run_dtype), x)  # run as the layer runs


def convert_stu_layers(
    module: nn.Module,
    get_fit: Callable[[nn.Module], LDSFit],
    measure: bool = True,
    max_error: float | None = None,
) -> list[LayerReport]:
    """Replace every STU layer inside `module` by its LDS; returns a per-layer measured report.

    With `max_error`, every layer is converted and measured first; if any measured error (impulse
    response or probe output) is above it, a one-line UserError names the layer and both numbers and
    no layer of `module` is changed. Only then are the layers swapped, one at a time.
    """
    fits, reports = _fit_and_measure_all(module, get_fit, measure or max_error is not None, max_error)
    # Each LDS is rebuilt (identically) as it goes in, and its STU is released once out, so the extra
    # memory is one layer, not an LDS for every layer (unless something else, an optimizer, holds them).
    for path, fit in fits.items():
        parent_path, _, attr = path.rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        setattr(parent, attr, lds_from_stu(getattr(parent, attr), fit))
    return reports


def _fit_and_measure_all(
    module: nn.Module, get_fit: Callable[[nn.Module], LDSFit], measure: bool, max_error: float | None
) -> tuple[dict[str, LDSFit], list[LayerReport]]:
    """Every STU layer's fit and report, each converted LDS measured and dropped before the next is
    built; a UserError for the first layer above `max_error`."""
    layers = find_stu_layers(module)
    if not layers:
        raise UserError(f"no STU layer found in {type(module).__name__}: nothing to distill")
    fits, reports = {}, []
    for path, stu in layers:
        fits[path] = get_fit(stu)
        reports.append(measure_layer(path, stu, fits[path], measure, max_error))
    return fits, reports


def measure_layer(
    path: str, stu: nn.Module, fit: LDSFit, measure: bool = True, max_error: float | None = None
) -> LayerReport:
    """Build the layer's LDS (which checks the fit's shape), measure it if asked, and let it go.
    The builds' random initialisation (overwritten) runs on a forked generator: measuring leaves the
    global random state, and so the training run after a swap, as it was."""
    nan = float("nan")
    with torch.random.fork_rng(devices=[]):  # layers are built on the CPU, then moved
        lds = lds_from_stu(stu, fit)
        ir, (out, run) = (filter_rel_mse(stu, lds), layer_errors(stu, lds)) if measure else (nan, (nan, nan))
    dtype = str(lds.run_dtype).removeprefix("torch.")
    report = LayerReport(path, type(stu).__name__, lds.state_dim, out, ir, run, dtype)
    if max_error is not None and not report.worst <= max_error:  # NaN is refused too
        raise UserError(
            f"{path or type(stu).__name__} ({type(stu).__name__}): the {lds.state_dim}-state LDS fits the "
            f"{stu.num_filters} {stu.variant!r} filters of length {stu.seq_len} only to relative MSE "
            f"{report.worst:.2e} (impulse response vs the layer's filters {ir:.2e}, LDS vs STU output on a "
            f"probe {out:.2e}, {dtype} decoding vs the LDS's float64 forward {run:.2e}) > max_fit_error "
            f"{max_error:g}; refusing to swap, no layer changed"
        )
    return report
