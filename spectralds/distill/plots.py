"""Figures: the spectral filters against the fitted LDS impulse responses."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from spectralds.distill.fit import LDSFit, impulse_response  # noqa: E402
from spectralds.filters import spectral_filters  # noqa: E402


def filter_fit_figure(fit: LDSFit, show: tuple[int, ...] = (0, 1, 5)) -> plt.Figure:
    """Top row: a few "+" filters and their LDS fits; bottom: |error| of every filter over time."""
    phi = spectral_filters(fit.seq_len, fit.num_filters, fit.variant)
    sign = (-1.0) ** torch.arange(fit.seq_len, dtype=torch.float64)
    target = torch.cat([phi, phi * sign[:, None]], dim=1)
    response = impulse_response(fit.A, fit.B, fit.C, fit.seq_len)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6))
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
