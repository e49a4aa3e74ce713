"""STU -> LDS conversion: every STU layer becomes an LDS layer with the same learned M.

The LDS (shared A, B, C from one filter fit) reproduces the 2K spectral filters, so the converted
layer computes the STU's function up to the fit error. Layers are found by type, so this works on
any module that holds registry-built STU layers, not only on our models.

Measured, not claimed: `convert_stu_layers` measures every converted layer against the STU it replaces
(never the fit file's metadata) with two numbers, `filter_rel_mse` (the LDS impulse response against
the layer's own filter buffer, column order and signs included) and `layer_error` (the LDS layer's
output against the STU layer's on a fixed probe input), and with `max_error` refuses, before any
layer is swapped, when either is above it. Both cost well under a second per layer at L=8192 (the
probe runs batch 1 on a few channels: FFT convolution for the STU, the chunked scan for the LDS).
Each measured LDS is dropped before the next is built and rebuilt, the same way, at the swap: the
conversion holds one layer more than the module, not a second copy of every converted layer.

A layer that carries its own filter bank (`store_filters`, e.g. a source's, whose columns may differ
from ours in order and sign) gets the fit's columns matched to its bank by measurement
(`spectralds.distill.bank_match`), or a one-line refusal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from spectralds.distill.bank_match import fit_for_bank
from spectralds.distill.lds_file import LDSFit
from spectralds.distill.measure import relative_mse, target_filters
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
    names = ("M_inputs", "M_filters_plus", "M_filters_minus") if tensordot else ("M_phi_plus", "M_phi_minus")
    names += ("ar.M_u", "ar.M_y") if ar else ()
    with torch.no_grad():
        for name in names:
            lds.get_parameter(name).copy_(stu.get_parameter(name))
    return lds.to(next(stu.parameters()).device)


@dataclass
class LayerReport:
    """How well one converted layer reproduces its STU (relative MSEs, measured at conversion):
    `rel_mse` of the outputs on the probe input, `filter_rel_mse` of the impulse response against the
    layer's filters."""

    path: str
    kind: str
    state_dim: int
    rel_mse: float
    filter_rel_mse: float = float("nan")


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
    tensordot = isinstance(stu, STUTensordot)
    cin, cout = _spread(stu.dim, channels), _spread(stu.dim_out, channels)
    dims = {"dim": cin.numel(), "dim_out": cout.numel(), "seq_len": stu.seq_len,
            "num_filters": stu.num_filters}
    kind = "stu_t" if tensordot else "stu"
    ar = {"ar_order": stu.ar.order} if stu.ar is not None else {}
    small_stu = build_layer(kind, variant=stu.variant, filters=stu.phi.cpu(), **dims, **ar)
    small_lds = build_layer("lds_ar" if ar else "lds", state_dim=lds.state_dim, mode=lds.mode,
                            learnable=False, **dims, **ar)
    small_lds.set_system(*(p.detach().cpu() for p in lds.system()), learnable=False)
    names = ("M_inputs", "M_filters_plus", "M_filters_minus") if tensordot else ("M_phi_plus", "M_phi_minus")
    names += ("ar.M_u", "ar.M_y") if ar else ()

    def pick(m: torch.Tensor, name: str) -> torch.Tensor:
        if name == "M_inputs":
            return m[cin][:, cout]
        if name in ("M_phi_plus", "M_phi_minus", "ar.M_u"):
            return m[:, cin][:, :, cout]
        # ar.M_y: outputs feed back only through the kept channels, in both small layers alike
        return m[:, cout][:, :, cout] if name == "ar.M_y" else m[:, cout]

    for small, big in ((small_stu, stu), (small_lds, lds)):
        for name in names:
            small.get_parameter(name).copy_(pick(big.get_parameter(name).detach().cpu(), name))
    device = stu.phi.device
    return small_stu.to(device), small_lds.to(device), cin.numel()


@torch.no_grad()
def layer_error(stu: nn.Module, lds: LDS, seed: int = PROBE_SEED, channels: int = PROBE_CHANNELS) -> float:
    """Relative MSE of the LDS output against the STU output on a fixed random probe input of full length
    (batch 1, `channels` input and output channels spread over the width; see `_probe_pair`)."""
    small_stu, small_lds, width = _probe_pair(stu, lds, channels)
    x = torch.randn(1, stu.seq_len, width, generator=torch.Generator().manual_seed(seed)).to(stu.phi.device)
    ref, out = small_stu(x).double(), small_lds(x).double()
    return ((out - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-300)).item()


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
        reports.append(_check_layer(path, stu, fits[path], measure, max_error))
    return fits, reports


def _check_layer(
    path: str, stu: nn.Module, fit: LDSFit, measure: bool, max_error: float | None
) -> LayerReport:
    """Build the layer's LDS (which checks the fit's shape), measure it if asked, and let it go.
    The builds' random initialisation (overwritten) runs on a forked generator: measuring leaves the
    global random state, and so the training run after a swap, as it was."""
    with torch.random.fork_rng(devices=[]):  # layers are built on the CPU, then moved
        lds = lds_from_stu(stu, fit)
        ir, out = (filter_rel_mse(stu, lds), layer_error(stu, lds)) if measure else (float("nan"),) * 2
    if max_error is not None and not (ir <= max_error and out <= max_error):
        raise UserError(
            f"{path or type(stu).__name__} ({type(stu).__name__}): the {lds.state_dim}-state LDS "
            f"fits the {stu.num_filters} {stu.variant!r} filters of length {stu.seq_len} only to "
            f"relative MSE {ir:.2e} (its impulse response vs the layer's filters; LDS vs STU output "
            f"on a probe: {out:.2e}) > max_fit_error {max_error:g}; refusing to swap, no layer changed"
        )
    return LayerReport(path, type(stu).__name__, lds.state_dim, out, ir)
