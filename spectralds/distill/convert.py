"""STU -> LDS conversion: every STU layer becomes an LDS layer with the same learned M.

The LDS (shared A, B, C from one filter fit) reproduces the 2K spectral filters, so the converted
layer computes the STU's function up to the fit error. Layers are found by type, so this works on
any module that holds registry-built STU layers, not only on our models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from spectralds.distill.fit import LDSFit
from spectralds.errors import UserError, UserTypeError
from spectralds.layers import build_layer
from spectralds.layers.lds import LDS
from spectralds.layers.stu import STU, STUTensordot

STU_TYPES = (STU, STUTensordot)


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
    tensordot = isinstance(stu, STUTensordot)
    lds = build_layer(
        "lds",
        dim=stu.dim,
        dim_out=stu.dim_out,
        seq_len=stu.seq_len,
        num_filters=stu.num_filters,
        state_dim=fit.state_dim,
        mode="tensordot" if tensordot else "exact",
        learnable=False,
    )
    lds.set_system(fit.A, fit.B, fit.C, learnable=False)
    names = ("M_inputs", "M_filters_plus", "M_filters_minus") if tensordot else ("M_phi_plus", "M_phi_minus")
    with torch.no_grad():
        for name in names:
            getattr(lds, name).copy_(getattr(stu, name))
    return lds.to(next(stu.parameters()).device)


@dataclass
class LayerReport:
    """How well one converted layer reproduces its STU on a random input (relative MSE)."""

    path: str
    kind: str
    state_dim: int
    rel_mse: float


def find_stu_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(path, sub) for path, sub in module.named_modules() if isinstance(sub, STU_TYPES)]


@torch.no_grad()
def layer_error(stu: nn.Module, lds: nn.Module, batch: int = 2, seed: int = 0) -> float:
    """Relative MSE of the LDS output against the STU output on a fixed random input of full length."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, stu.seq_len, stu.dim, generator=gen).to(next(stu.parameters()).device)
    ref, out = stu(x).double(), lds(x).double()
    return ((out - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-300)).item()


def convert_stu_layers(
    module: nn.Module, get_fit: Callable[[nn.Module], LDSFit], measure: bool = True
) -> list[LayerReport]:
    """Replace every STU layer inside `module` by its LDS; returns a per-layer error report."""
    layers = find_stu_layers(module)
    if not layers:
        raise UserError(f"no STU layer found in {type(module).__name__}: nothing to distill")
    reports = []
    for path, stu in layers:
        lds = lds_from_stu(stu, get_fit(stu))
        err = layer_error(stu, lds) if measure else float("nan")
        parent_path, _, attr = path.rpartition(".")
        setattr(module.get_submodule(parent_path) if parent_path else module, attr, lds)
        reports.append(LayerReport(path, type(stu).__name__, lds.state_dim, err))
    return reports
