"""The distilled, constant-time replacements of the STU layers: LDS (exact) and LDS-T (tensordot).

Both run one diagonal system shared by every channel (`spectralds.layers.lds_system.LDS`: A, B, C, the
scan and convolution paths, decoding) and carry the learned projections of the STU layer they replace,
as STU and STU-T share `SpectralConv` (`spectralds.layers.stu`):

* `LDSExact` (the STU's): U_t = the system's 2K features of every input channel,
  y_t = sum_k U_t[k] @ M_phi_plus[k] + U_t[K + k] @ M_phi_minus[k]  (M_phi_*: (K, dim, dim_out)).
* `LDSTensordot` (STU-T's): the system runs on x @ M_inputs (dim, dim_out), and channel o reads its
  2K features out with M_filters_plus[:, o], M_filters_minus[:, o] ((K, dim_out) each), folded into C.

`build_layer("lds", mode="exact" | "tensordot", ...)` builds either (`make_lds`); checkpoints store that
name and mode (`LDS.spec`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from spectralds.errors import UserError
from spectralds.layers.lds_system import LDS
from spectralds.layers.registry import register_layer
from spectralds.ops.fft_conv import no_autocast
from spectralds.ops.lds_conv import depthwise_conv, exact_conv
from spectralds.ops.lds_scan import mapped_state_response, table_dtype


class LDSExact(LDS):
    """The exact STU's projections around the system: M_phi_plus, M_phi_minus (K, dim, dim_out), the
    "+" and "-" features of every input channel mixed into every output (arguments: `LDS`)."""

    mode = "exact"
    projections = {"M_phi_plus": ("", "in", "out"), "M_phi_minus": ("", "in", "out")}

    def _init_projections(self) -> None:
        K, d, d_out, dtype = self.num_filters, self.dim, self.dim_out, self.run_dtype
        std = (2 * K * d) ** -0.5
        self.M_phi_plus = nn.Parameter(torch.randn(K, d, d_out, dtype=dtype) * std)
        self.M_phi_minus = nn.Parameter(torch.randn(K, d, d_out, dtype=dtype) * std)

    @property
    def channels(self) -> int:
        """The system runs on every input channel."""
        return self.dim

    def stacked_projection(self) -> torch.Tensor:
        """(2K, dim, dim_out): the "+" features' projection, then the "-" features'."""
        return torch.cat([self.M_phi_plus, self.M_phi_minus])

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _scan_readout(self, dtype: torch.dtype) -> torch.Tensor:
        return self.C  # (h, 2K), shared by all channels; the scan casts it

    def _read_scan(self, U: torch.Tensor) -> torch.Tensor:
        return self._project(U.transpose(2, 3))  # (B, T, 2K, d): contiguous, see `ops.lds_scan.scan`

    def _step_readout(self, C: torch.Tensor) -> torch.Tensor:
        return C

    def _read_state(self, state: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        # The features in the state's dtype, outside autocast as in the scan: their terms cancel, so a
        # bf16 readout of the state loses the fit; the projection, as the scan's, follows autocast.
        with no_autocast(state.device):
            U = C.T @ state.transpose(1, 2)  # (B, 2K, d)
        return self._project(U)  # -> (B, d_out)

    def _project(self, U: torch.Tensor) -> torch.Tensor:
        """U (..., 2K, d) -> (..., d_out), as two matmuls on views of M (no copy of M)."""
        K, M_plus, M_minus = self.num_filters, self.M_phi_plus, self.M_phi_minus
        U = U.to(M_plus.dtype)
        U_plus, U_minus = U[..., :K, :].flatten(-2), U[..., K:, :].flatten(-2)
        return U_plus @ M_plus.flatten(0, 1) + U_minus @ M_minus.flatten(0, 1)

    def _conv_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _conv(self, z: torch.Tensor, T: int, n: int, dtype: torch.dtype, path: str) -> torch.Tensor:
        m = self.stacked_projection().to(dtype)  # M may have been cast
        return exact_conv(z, self._response_spectrum(T, n, dtype, stacked=False), m, n, path)

    def _carried_outputs(self, state: torch.Tensor, T: int) -> torch.Tensor:
        """`LDS._carried_outputs` by one map per state (`state_maps`: float64, no autograd through it),
        not a readout of every channel at every step projected by M (T times the work)."""
        if table_dtype(state.device) != torch.float64 or torch.is_grad_enabled():
            return super()._carried_outputs(state, T)
        return mapped_state_response(state, self.system()[0], self.state_maps(self.C), T)

    def state_maps(self, C: torch.Tensor) -> torch.Tensor:
        """(h, dim_out, dim) float64: W_j, the map from state j's copies (one per input channel) to the
        output, for the readout C (h, 2K)."""
        return torch.einsum("jk,kdo->jod", C.double(), self.stacked_projection().detach().double())

    def filter_weight(self) -> torch.Tensor:
        """(2K, dim * dim_out) float64 W such that ||E W||_F^2 is the output error for an error E
        (length, 2K) of the 2K filters and a white, unit-variance input in every channel: output o gets
        sum_{k, i} (E_k * x_i) M[k, i, o]."""
        return self.stacked_projection().detach().double().reshape(2 * self.num_filters, -1)


class LDSTensordot(LDS):
    """STU-T's projections around the system: M_inputs (dim, dim_out) first, then each channel's own
    mix of its 2K features, M_filters_plus, M_filters_minus (K, dim_out) (arguments: `LDS`)."""

    mode = "tensordot"
    depthwise = True
    projections = {"M_inputs": ("in", "out"), "M_filters_plus": ("", "out"), "M_filters_minus": ("", "out")}

    def _init_projections(self) -> None:
        K, d, d_out, dtype = self.num_filters, self.dim, self.dim_out, self.run_dtype
        self.M_inputs = nn.Parameter(torch.randn(d, d_out, dtype=dtype) * d**-0.5)
        self.M_filters_plus = nn.Parameter(torch.randn(K, d_out, dtype=dtype) * (2 * K) ** -0.5)
        self.M_filters_minus = nn.Parameter(torch.randn(K, d_out, dtype=dtype) * (2 * K) ** -0.5)

    @property
    def channels(self) -> int:
        """The system runs on the channels of x @ M_inputs."""
        return self.dim_out

    def stacked_projection(self) -> torch.Tensor:
        """(2K, dim_out): each channel's mix of the "+" features, then of the "-" features."""
        return torch.cat([self.M_filters_plus, self.M_filters_minus])

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.M_inputs

    def _scan_readout(self, dtype: torch.dtype) -> torch.Tensor:
        """M_filters folded into C: one readout column per channel, (d_out, h, 1), in `dtype`."""
        M = self.stacked_projection()  # (2K, d_out): one matmul
        return (self.C.to(dtype) @ M.to(dtype)).T[:, :, None]

    def _read_scan(self, U: torch.Tensor) -> torch.Tensor:
        return U.squeeze(-1)

    def _step_readout(self, C: torch.Tensor) -> torch.Tensor:
        return self._scan_readout(table_dtype(C.device))[..., 0].to(self.run_dtype)  # (d_out, h)

    def _read_state(self, state: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        return (state * C).sum(-1)

    def _conv_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.M_inputs.T, x.transpose(1, 2))  # time-last, ready for the FFT

    def _conv(self, z: torch.Tensor, T: int, n: int, dtype: torch.dtype, path: str) -> torch.Tensor:
        if self.learnable:  # rebuilt anyway: fold M_filters into C, one FFT per channel, no mix
            return depthwise_conv(z, self._response_spectrum(T, n, dtype, stacked=False, folded=True), n)
        # the FFT is linear: mix the cached 2K response spectra into one kernel per channel
        mixed = self._response_spectrum(T, n, dtype, stacked=True) @ self.stacked_projection().to(dtype)
        return depthwise_conv(z, torch.complex(*mixed.chunk(2)), n)

    def state_maps(self, C: torch.Tensor) -> torch.Tensor:
        """(h, dim_out, dim) float64: W_j = diag(v_j) M_inputs^T with v_j = C[j] @ M_filters, the map
        from state j's copies (one per input channel) to the output, for the readout C (h, 2K)."""
        K, C = self.num_filters, C.double()
        plus, minus = self.M_filters_plus.detach().double(), self.M_filters_minus.detach().double()
        v = C[:, :K] @ plus + C[:, K:] @ minus  # (h, d_out)
        return v[:, :, None] * self.M_inputs.detach().double().T[None]

    def filter_weight(self) -> torch.Tensor:
        """(2K, dim_out) float64 W such that ||E W||_F^2 is the output error for an error E (length, 2K)
        of the 2K filters and a white, unit-variance input in every channel: channel o of x @ M_inputs
        goes through the filter sum_k E_k M_filters[k, o]."""
        M = self.stacked_projection().detach().double()
        return M * torch.linalg.vector_norm(self.M_inputs.detach().double(), dim=0)


LAYERS = {"exact": LDSExact, "tensordot": LDSTensordot}
MODES = tuple(LAYERS)


def lds_class(mode: str, layers: dict[str, type[LDS]] = LAYERS) -> type[LDS]:
    """The layer class of an LDS `mode` (one of MODES), from `layers`; a UserError names any other."""
    if not isinstance(mode, str) or mode not in layers:
        raise UserError(f"unknown LDS mode {mode!r}; expected one of {MODES}")
    return layers[mode]


@register_layer("lds")
def make_lds(
    dim: int, seq_len: int | None = None, num_filters: int = 24, state_dim: int = 80, mode: str = "exact",
    *args: Any, **kwargs: Any,
) -> LDS:
    """`LDSExact` (mode "exact") or `LDSTensordot` ("tensordot"); the other arguments are `LDS`'s."""
    return lds_class(mode)(dim, seq_len, num_filters, state_dim, *args, **kwargs)


__all__ = ["LDS", "LDSExact", "LDSTensordot", "MODES", "lds_class", "make_lds"]
