"""How an LDS layer's training forward runs: the chunked scan or a convolution with its impulse response.

A mixin of `spectralds.layers.lds.LDS` (kept apart to keep that module short): the path choice by the
cost estimates of `spectralds.ops.lds_conv`, the convolution itself, and the cached response spectrum of
a fixed (fitted) system. It uses the layer's mode, system(), M_* parameters, run_dtype and `_spectra`.
"""

from __future__ import annotations

import torch

from spectralds.errors import check_choice
from spectralds.ops.fft_conv import fft_size, no_autocast
from spectralds.ops.lds_conv import (
    CONV_PATHS,
    conv_flops,
    depthwise_conv,
    exact_conv,
    lds_conv_forward_flops,
    powers,
    response_spectrum,
    scan_flops,
    scan_forward_flops,
)


class ConvolutionPaths:
    """The sequence paths of an LDS: `conv_path` picks one, "auto" by estimated cost."""

    # "auto": the cheapest of the scan and the convolution arrangements by `ops.lds_conv`'s estimates;
    # "scan", "conv" (the cheaper arrangement), "kernel" / "project" (exact mode) pin one.
    conv_path: str = "auto"

    def _sequence_path(self, batch: int, T: int, backward: bool | None = None) -> str:
        """The path for this shape; `backward` (default: whether grad is enabled) picks the estimates of a
        training step or of a forward alone (inference, prefill)."""
        path, exact = check_choice("LDS conv_path", self.conv_path, CONV_PATHS), self.mode == "exact"
        if path in ("kernel", "project"):
            return path if exact else "conv"
        if path == "scan":
            return path
        cols = 2 * self.num_filters
        costs = conv_flops(batch, T, self.dim, self.dim_out, cols, self.state_dim, exact, self.learnable)
        best = min(costs, key=costs.get)
        readout = 2 * cols * self.dim * self.dim_out if exact else 0
        h, c = self.state_dim, self.chunk_size
        backward = torch.is_grad_enabled() if backward is None else backward
        scan = scan_flops(batch, T, self.channels, h, c, cols if exact else 1, readout, shared=exact,
                          backward=backward)
        return best if path == "conv" or costs[best] <= scan else "scan"

    def forward_flops(self, batch: int, seq_len: int) -> float:
        """Forward FLOPs of the path a training step's `forward` takes (`ops.lds_conv.scan_forward_flops`
        plus the readout or input projection, or `lds_conv_forward_flops`)."""
        path, exact = self._sequence_path(batch, seq_len, backward=True), self.mode == "exact"
        cols, h, c = 2 * self.num_filters, self.state_dim, self.chunk_size
        if path != "scan":
            args = (batch, seq_len, self.dim, self.dim_out, cols, h, exact, self.learnable, path)
            return lds_conv_forward_flops(*args)
        proj = 2 * batch * seq_len * self.dim * self.dim_out  # tensordot: x @ M_inputs; exact: per filter
        if exact:
            return scan_forward_flops(batch, seq_len, self.dim, h, c, cols, 1) + cols * proj
        fold = 2 * h * cols * self.dim_out  # M_filters folded into C (`_tensordot_C`)
        return scan_forward_flops(batch, seq_len, self.dim_out, h, c, 1, self.dim_out) + proj + fold

    def _convolve(self, x: torch.Tensor, path: str) -> torch.Tensor:
        """`forward` as a causal convolution with the impulse response (ops.lds_conv), in the run dtype, or
        float64 for float64 inputs: an FFT spreads rounding over every position, so this keeps float64
        inputs causal to float64 rounding (the scan is causal by construction)."""
        T, exact = x.shape[1], self.mode == "exact"
        dt = torch.float64 if x.dtype == torch.float64 else self.run_dtype
        n = fft_size(2 * T - 1)
        # tensordot: as in the scan, this matmul follows autocast; computed time-last, ready for the FFT
        z = x if exact else torch.matmul(self.M_inputs.T, x.transpose(1, 2))
        with no_autocast(x.device):
            if exact:
                m = torch.cat([self.M_phi_plus, self.M_phi_minus]).to(dt)  # M may have been cast
                y = exact_conv(z.to(dt), self._response_spectrum(T, n, dt, stacked=False), m, n, path)
            elif self.learnable:  # rebuilt anyway: fold M_filters into C, one FFT per channel, no mix
                spectrum = self._response_spectrum(T, n, dt, stacked=False, folded=True)
                y = depthwise_conv(z.to(dt), spectrum, n)
            else:  # the FFT is linear: mix the cached 2K response spectra into one kernel per channel
                mixed = self._response_spectrum(T, n, dt, stacked=True) @ torch.cat(
                    [self.M_filters_plus, self.M_filters_minus]
                ).to(dt)
                y = depthwise_conv(z.to(dt), torch.complex(*mixed.chunk(2)), n)
        return y.to(x.dtype)

    def _final_state(self, x: torch.Tensor) -> torch.Tensor:
        """The state after x (B, T, dim) from a zero state, (B, channels, h) in the run dtype: the sum of
        A^(T-1-t) B u_t over t (u = x, or x @ M_inputs in tensordot mode), one matmul with the powers
        built in float64 (no large power is formed in float32)."""
        u = x if self.mode == "exact" else x @ self.M_inputs
        A, B, _ = self.system()
        tdt = table_dtype(x.device)
        weights = (powers(A.to(tdt), 0, x.shape[1]).flip(0) * B.to(tdt)).to(self.run_dtype)  # (T, h)
        return torch.einsum("btc,th->bch", u.to(self.run_dtype), weights)

    def _response_spectrum(
        self, T: int, n: int, dtype: torch.dtype, stacked: bool, folded: bool = False
    ) -> torch.Tensor:
        """Spectrum of the impulse response at lags 0..T-1 (ops.lds_conv.response_spectrum) in `dtype`,
        from float64 tables. A fixed system's is cached per FFT length (invalidated when A, B or
        C is replaced or edited); a learnable one's is rebuilt, differentiably, every call.
        folded: the response of the tensordot readout (C with M_filters folded in, one per channel)."""
        def build() -> torch.Tensor:
            tdt = table_dtype(self.B.device)
            A, B, C = self.system()
            A, B = A.to(tdt), B.to(tdt)
            C = self._tensordot_C(tdt)[..., 0].T if folded else C.to(tdt)
            # A learnable system's FFT runs in `dtype` (it is rebuilt every step); a fixed one's
            # is computed once, in float64.
            spectrum = response_spectrum(A, B, C, T, n, stacked, dtype if self.learnable else None)
            return spectrum.to(dtype if stacked else _complex(dtype))

        if self.learnable:
            return build()
        return self._spectra.get((self.A, self.B, self.C), (T, n, stacked, dtype), build)


def table_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def _complex(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64
