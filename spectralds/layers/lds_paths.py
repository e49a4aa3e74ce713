"""How an LDS layer's training forward runs: the chunked scan or a convolution with its impulse response.

A mixin of `spectralds.layers.lds_system.LDS` (kept apart to keep that module short): the path, pinned
by the `conv_path` argument or chosen per shape and device by `spectralds.ops.costs.lds_path`, its FLOPs
(`ops.costs.lds_flops`) and the cached response spectrum of a fixed (fitted) system. The convolution
itself is the layer's `_conv` (exact: `exact_conv`, tensordot: `depthwise_conv`). It uses the layer's
`depthwise`, system(), run_dtype and `_spectra`.
"""

from __future__ import annotations

import torch

from spectralds.ops.costs import LDS_PATHS, LDSShape, conv_path_property, lds_flops, lds_path
from spectralds.ops.fft_conv import fft_size, no_autocast
from spectralds.ops.lds_conv import response_spectrum
from spectralds.ops.lds_scan import table_dtype


class ConvolutionPaths:
    """The sequence paths of an LDS: `conv_path` pins one, "auto" chooses by estimated cost."""

    # "auto": the cheapest of the scan and the convolution arrangements (`ops.costs.lds_path`); "scan",
    # "conv" (the cheaper arrangement), "kernel" / "project" (exact mode) pin one.
    conv_path = conv_path_property("LDS", LDS_PATHS)
    # False: the 2K features of every channel are read out by one shared readout (exact); True: each
    # channel has its own readout, a single column (tensordot), as in `layers.stu.SpectralConv`.
    depthwise: bool = False

    def cost_shape(self) -> LDSShape:
        """What the layer's costs depend on besides the input shape (`ops.costs`)."""
        cols = 2 * self.num_filters
        return LDSShape(self.dim, self.dim_out, cols, self.state_dim, self.chunk_size, not self.depthwise,
                        self.learnable)

    def _sequence_path(self, batch: int, T: int, backward: bool | None = None) -> str:
        """The path for this shape on the layer's device; `backward` (default: whether grad is enabled)
        picks the estimates of a training step or of a forward alone (inference, prefill)."""
        backward = torch.is_grad_enabled() if backward is None else backward
        return lds_path(self.B.device.type, self.cost_shape(), self.conv_path, batch, T, backward)

    def forward_flops(self, batch: int, seq_len: int) -> float:
        """Forward FLOPs of the path a training step's `forward` takes (`ops.costs.lds_flops`)."""
        path = self._sequence_path(batch, seq_len, backward=True)
        return lds_flops(self.cost_shape(), batch, seq_len, path)

    def _convolve(self, x: torch.Tensor, path: str) -> torch.Tensor:
        """`forward` as a causal convolution with the impulse response (ops.lds_conv, the layer's `_conv`),
        in the run dtype, or float64 for float64 inputs: an FFT spreads rounding over every position, so
        this keeps float64 inputs causal to float64 rounding (the scan is causal by construction)."""
        T = x.shape[1]
        dt = torch.float64 if x.dtype == torch.float64 else self.run_dtype
        z = self._conv_inputs(x)  # follows autocast, as the scan's input projection does
        with no_autocast(x.device):
            y = self._conv(z.to(dt), T, fft_size(2 * T - 1), dt, path)
        return y.to(x.dtype)

    def _response_spectrum(
        self, T: int, n: int, dtype: torch.dtype, stacked: bool, folded: bool = False
    ) -> torch.Tensor:
        """Spectrum of the impulse response at lags 0..T-1 (ops.lds_conv.response_spectrum) in `dtype`,
        from float64 tables. A fixed system's is cached per FFT length (invalidated when A, B or
        C is replaced or edited); a learnable one's is rebuilt, differentiably, every call.
        folded: the response of the layer's per-channel scan readout (`_scan_readout`: tensordot)."""
        def build() -> torch.Tensor:
            tdt = table_dtype(self.B.device)
            A, B, C = self.system()
            A, B = A.to(tdt), B.to(tdt)
            C = self._scan_readout(tdt)[..., 0].T if folded else C.to(tdt)
            # A learnable system's FFT runs in `dtype` (it is rebuilt every step); a fixed one's
            # is computed once, in float64.
            spectrum = response_spectrum(A, B, C, T, n, stacked, dtype if self.learnable else None)
            return spectrum.to(dtype if stacked else _complex(dtype))

        if self.learnable:
            return build()
        return self._spectra.get((self.A, self.B, self.C), (T, n, stacked, dtype), build)


def _complex(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64
