"""Figures: the spectral filters against the fitted LDS impulse responses.

A bare matplotlib Figure with its own Agg canvas: no pyplot, so importing this never switches the
process's matplotlib backend and no figure lingers in pyplot's registry.
"""

from __future__ import annotations

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from spectralds.distill.fit import LDSFit
from spectralds.filters import spectral_filters
from spectralds.ops.lds_conv import impulse_response_ref


def filter_fit_figure(fit: LDSFit, show: tuple[int, ...] = (0, 1, 5)) -> Figure:
    """Top row: a few "+" filters and their LDS fits; bottom: |error| of every filter over time."""
    phi = spectral_filters(fit.seq_len, fit.num_filters, fit.variant)
    sign = (-1.0) ** torch.arange(fit.seq_len, dtype=torch.float64)
    target = torch.cat([phi, phi * sign[:, None]], dim=1)
    response = impulse_response_ref(fit.A, fit.B, fit.C, fit.seq_len)
    fig = Figure(figsize=(8, 6))
    FigureCanvasAgg(fig)  # attaches itself: savefig and TensorBoard's add_figure render through it
    top, bottom = fig.subplots(2, 1)
    t = torch.arange(fit.seq_len)
    for k in show:
        if k < fit.num_filters:
            top.plot(t, target[:, k], lw=2, alpha=0.5, label=f"filter {k}")
            top.plot(t, response[:, k], "--", lw=1, label=f"LDS {k}")
    top.set_xscale("symlog", linthresh=10)
    top.set_title(f"spectral filters vs LDS impulse responses ({fit.state_dim} states, L={fit.seq_len})")
    top.legend(fontsize=7, ncol=3)
    err = (response - target).abs().clamp_min(1e-300)
    bottom.semilogy(t, err[:, : fit.num_filters].max(dim=1).values, label='"+" filters')
    bottom.semilogy(t, err[:, fit.num_filters :].max(dim=1).values, label='"-" filters')
    bottom.set_xlabel("t")
    bottom.set_ylabel("max |LDS - filter|")
    bottom.legend()
    fig.tight_layout()
    return fig
