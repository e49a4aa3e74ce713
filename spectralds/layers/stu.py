"""Spectral Transform Unit layers: STU (exact, "stu") and its tensordot approximation STU-T ("stu_t").

Both convolve the input with K fixed spectral filters phi_k (see `spectralds.filters`) along two
branches: the "+" branch uses phi_k(s), the "-" branch the alternating filter (-1)^s phi_k(s). Lag 0 is
included, so y_t depends on x_0..x_t. Convolutions run by FFT in float32 (float64 for float64 inputs)
with autocast disabled, whatever the ambient precision; projections before them follow autocast.

The spectrum of the fixed filter bank [phi, (-1)^s phi] is computed once per FFT length and kept on the
layer (`_filter_spectra`); STU-T projects it with its learned filter mix on every call (that part
depends on parameters). Decoding (`init_state` / `prefill` / `step`) is exact; `decode_method` picks
"futurefill" (default) or "naive" (see `spectralds.layers.futurefill`). `ar_order` > 0 adds the STU
paper's autoregressive terms (`spectralds.layers.ar`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from spectralds.errors import UserError, check_int
from spectralds.layers import futurefill
from spectralds.layers.ar import ar_init_state, ar_merge_states, ar_prefill, ar_step, make_ar
from spectralds.layers.filter_bank import FilterBankLayer, cached_filters, check_bank
from spectralds.layers.futurefill import ConvDecodeState
from spectralds.layers.registry import DECODE_METHODS, check_continuation, register_layer
from spectralds.ops.costs import STU_PATHS, conv_flops, conv_path_property, stu_arrangement
from spectralds.ops.fft_conv import (
    alternating,
    compute_dtype,
    fft_size,
    filter_spectra,
    filter_sum,
    kernel_mix,
    no_autocast,
    real_fft,
)
from spectralds.ops.spectrum_cache import SpectrumCache

_SPECTRA_KEPT = 8  # filter spectra kept per layer (one per FFT length in use: training, prefills)


class SpectralConv(FilterBankLayer):
    """What STU and STU-T share: filters, validation, the FFT convolution, the spectrum cache, decoding.

    A subclass says how its learned projections wrap the convolution:
      depthwise: False: the 2K filters each convolve every encoded channel and are summed (STU);
        True: each channel has its own kernel, a mix of the 2K filters (STU-T).
      _init_projections(): create the parameters (called once by the one constructor).
      _encoder_weight(): the projection applied before the convolution, (dim, width).
      _bank_weight(dtype): None, or the (2K, dim_out) mix of the filters into per-channel kernels.
    """

    depthwise = False
    decode_methods = DECODE_METHODS
    decode_method = "futurefill"

    def __init__(
        self,
        dim: int,
        seq_len: int,
        num_filters: int = 24,
        dim_out: int | None = None,
        variant: str = "hankel",
        use_hankel_L: bool = False,
        filters: torch.Tensor | None = None,
        ar_order: int = 0,
        store_filters: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("seq_len", seq_len), ("num_filters", num_filters)):
            check_int(name, value)
        if num_filters > seq_len:
            raise UserError(f"num_filters ({num_filters}) cannot exceed seq_len ({seq_len})")
        if dim_out is not None:
            check_int("dim_out", dim_out)
        if use_hankel_L:
            if variant not in ("hankel", "hankel_L"):
                raise UserError(f"use_hankel_L=True conflicts with variant={variant!r}")
            variant = "hankel_L"
        if filters is None:
            filters = cached_filters(seq_len, num_filters, variant)
        check_bank("filters", filters, seq_len, num_filters)
        self.dim, self.dim_out = dim, dim_out or dim
        self.seq_len, self.num_filters, self.variant = seq_len, num_filters, variant
        self._register_bank(filters, store_filters)  # store_filters: phi in the state dict (filter_bank)
        self._spectra = SpectrumCache(_SPECTRA_KEPT)
        self._init_projections()
        self.ar = make_ar(dim, self.dim_out, ar_order, seq_len)  # AR terms (spectralds.layers.ar); None for 0

    def _init_projections(self) -> None:
        raise NotImplementedError

    def _encoder_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _bank_weight(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, dim_out={self.dim_out}, seq_len={self.seq_len}, "
            f"num_filters={self.num_filters}, variant={self.variant!r}"
            + (", store_filters=True" if self.store_filters else "")
        )

    # ---- the kernel bank and its spectrum ---------------------------------------------------------
    def _filter_spectra(
        self, lo: int, hi: int, n: int, dtype: torch.dtype, stacked: bool = False
    ) -> torch.Tensor:
        """rfft (padded to n) of [phi, (-1)^s phi] at lags lo..hi-1, (n // 2 + 1, 2K) complex, cached;
        stacked: its real parts over its imaginary parts, (2 (n // 2 + 1), 2K) real, one matmul away
        from a projected spectrum.

        Only `phi` enters, which no optimizer changes: the cache (`ops.spectrum_cache`) is emptied
        when phi is replaced, edited in place (its version counter) or moved. Inference-mode tensors
        cannot be saved for backward, so they are kept apart from the ones a training step may use.
        """

        def build() -> torch.Tensor:
            spectrum = filter_spectra(self.phi.to(dtype), lo, hi, n)
            return torch.cat([spectrum.real, spectrum.imag]) if stacked else spectrum

        return self._spectra.get((self.phi,), (lo, hi, n, dtype, stacked), build)

    def _kernel(self, length: int, dtype: torch.dtype) -> torch.Tensor:
        """The kernel bank at lags 0..length-1: (length, 2K) for STU, (length, dim_out) for STU-T."""
        phi = self.phi[:length].to(dtype)
        bank = torch.cat([phi, phi * alternating(length, 0, dtype, phi.device)[:, None]], dim=1)
        weight = self._bank_weight(dtype)
        return bank if weight is None else bank @ weight

    def _kernel_spectrum(self, lo: int, hi: int, n: int, dtype: torch.dtype) -> torch.Tensor:
        """rfft, zero-padded to n, of the kernel bank at lags lo..hi-1: (n // 2 + 1, columns)."""
        weight = self._bank_weight(dtype)
        if weight is None:
            return self._filter_spectra(lo, hi, n, dtype)
        # The FFT is linear: mix the cached filter spectra (one real matmul), never FFT the mixed kernels.
        mixed = self._filter_spectra(lo, hi, n, dtype, stacked=True) @ weight
        return torch.complex(*mixed.chunk(2))

    # ---- encoded inputs and the contraction with the bank ----------------------------------------
    def _encode(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, dim) -> encoded inputs, time last, in the ambient (autocast) precision:
        (B, 2K, dim_out, T) for STU, (B, dim_out, T) for STU-T."""
        weight = self._encoder_weight() if weight is None else weight
        z = torch.matmul(weight.to(x.dtype).T, x.transpose(1, 2))
        return z if self.depthwise else z.unflatten(1, (2 * self.num_filters, self.dim_out))

    def _contract(self, zf: torch.Tensor, spectrum: torch.Tensor) -> torch.Tensor:
        """Encoded spectra (B, ..., F) times kernel spectra (F, columns) -> (B, dim_out, F)."""
        return zf * spectrum.T if self.depthwise else filter_sum(zf, spectrum)

    def _contract_taps(self, z: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
        """Encoded inputs (B, ..., m) and taps (U, m, columns), summed over m -> (B, U, dim_out)."""
        if self.depthwise:
            return (z[:, None] * taps.permute(0, 2, 1)).sum(-1)
        z = z.transpose(1, 2).flatten(2)  # one matmul: (B, dim_out, 2K * m) @ (2K * m, U)
        return (z @ taps.permute(2, 1, 0).flatten(0, 1)).transpose(1, 2)

    # ---- sequences ---------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise UserError(f"expected input of shape (batch, seq, {self.dim}), got {tuple(x.shape)}")
        if x.shape[1] > self.seq_len:
            raise UserError(
                f"sequence length {x.shape[1]} exceeds the layer's seq_len {self.seq_len} "
                "(the length of its filters)"
            )

    def forward(self, x: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x)
        if x.shape[1] == 0:
            return x.new_zeros(x.shape[0], 0, self.dim_out)
        y = self._sequence_conv(x, x.shape[1]).to(x.dtype)  # then the AR terms, if any:
        return y if self.ar is None else self.ar(x, y)

    def forward_flops(self, batch: int, seq_len: int) -> float:
        """Forward FLOPs of the arrangement `forward` takes (`ops.costs.conv_flops`); the AR terms'
        weights, a submodule's, are left to telemetry's generic rule."""
        cols, arrangement = 2 * self.num_filters, self._arrangement(batch, seq_len, seq_len)
        return conv_flops(batch, seq_len, seq_len, cols, self.dim, self.dim_out, arrangement)

    def _arrangement(self, batch: int, steps: int, length: int) -> str:
        """The arrangement for inputs at `steps` positions and outputs at `length`, on the layer's device."""
        return "depthwise"  # STU-T's one path; the STU overrides it

    def _sequence_conv(self, x: torch.Tensor, length: int) -> torch.Tensor:
        """Outputs at positions 0..length-1 (length >= T) for inputs x (B, T, dim), in compute dtype."""
        z = self._encode(x)
        with no_autocast(x.device):
            return self._fill_fft(z.to(compute_dtype(x.dtype)), 0, length)

    def _fill_fft(
        self, z: torch.Tensor, start: int, length: int, spectrum: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Outputs at positions start..start+length-1 from encoded inputs z at positions 0..m-1."""
        m = z.shape[-1]
        lo = max(0, start - m + 1)  # smallest lag that occurs
        n = fft_size(m + length - 1)  # large enough that no circular wrap-around reaches kept outputs
        if spectrum is None:
            spectrum = self._kernel_spectrum(lo, start + length, n, z.dtype)
        y = torch.fft.irfft(self._contract(real_fft(z, n), spectrum), n=n)
        return y[..., start - lo : start - lo + length].transpose(1, 2)

    # ---- decoding (spectralds.layers.futurefill) ------------------------------------------------------
    def init_state(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> ConvDecodeState:
        """An empty state; `dtype` is the activations' dtype (buffers are float32, float64 for float64)."""
        state = futurefill.init_state(self, batch_size, device, dtype)
        return state if self.ar is None else ar_init_state(self, state, batch_size, device, dtype)

    def prefill(
        self, x: torch.Tensor, start: torch.Tensor | None = None, state: Any = None, keep_state: bool = True
    ) -> tuple[torch.Tensor, Any]:
        """Outputs for a prompt x (B, P, dim) and the state after it, by one FFT pass (`start`: unused);
        state: continue from it (`SequenceLayer.prefill`, `futurefill.prefill_from`); keep_state=False:
        a continuation's outputs only, state None (AR terms keep theirs)."""
        check_continuation(start, state, x.shape[0], None)  # the batch: futurefill.prefill_from
        if self.ar is None:
            return futurefill.prefill(self, x, state, keep_state)
        return ar_prefill(self, x, self.prefill, state)

    def continues_repeated(self) -> bool:  # FutureFill / naive outputs (`futurefill.outputs_from`)
        return self.ar is None

    def step(self, x_t: torch.Tensor, state: ConvDecodeState) -> tuple[torch.Tensor, ConvDecodeState]:
        """One token x_t (B, dim) -> (y_t (B, dim_out), state), as `forward` would give it."""
        return futurefill.step(self, x_t, state) if self.ar is None else ar_step(self, x_t, state, self.step)

    def merge_states(self, states: list) -> Any:  # right-aligned (futurefill.merge_states), AR alongside
        return ar_merge_states(self, states, futurefill.merge_states)


@register_layer("stu")
class STU(SpectralConv):
    """Exact Spectral Transform Unit.

    y = sum_k (phi_k * x) M_phi_plus[k] + ((-1)^s phi_k * x) M_phi_minus[k], with * the causal
    convolution over time per input channel (lag 0 included) and phi = `self.phi` (seq_len, K).

    What an LDS conversion reads: `M_phi_plus`, `M_phi_minus` (num_filters, dim, dim_out), `phi`,
    `seq_len`, `num_filters`, `variant`, `dim`, `dim_out`. An LDS whose 2K impulse responses reproduce
    [phi, (-1)^s phi] (lag 0 included) replaces the convolution exactly; M stays as it is.

    Init: M_phi_plus, M_phi_minus ~ normal(0, std = (num_filters * dim) ** -0.5).

    Sequences take one of two exact arrangements: `conv_path` ("kernel" / "project") pins one, "auto"
    (default) takes the cheaper for the shape and device at hand (`ops.costs.stu_arrangement`):
    * kernel: the per-frequency (dim, dim_out) kernel W(f) = sum_k S_k(f) M_k is built from the K filter
      spectra (`ops.kernel_mix`: a chunk of frequencies at a time, rebuilt in backward), then each input
      spectrum is multiplied by W(f). Its cost does not grow with the batch; usually the faster one.
    * project: z = x @ M (one (dim, 2K * dim_out) matmul), one FFT per (filter, output channel), a sum
      over filters in frequency space (`ops.filter_sum`) and dim_out inverse FFTs. Cheaper for batch 1-2.
    """

    conv_path = conv_path_property("STU", STU_PATHS)

    def __init__(self, *args: Any, conv_path: str = "auto", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conv_path = conv_path

    def spec(self) -> dict[str, Any] | None:
        """The `build_layer` arguments (None: not built by it), with `conv_path` as it is now (listed when
        pinned, so the specs of "auto" layers, checkpoints from before it included, stay as they were)."""
        if self.build_spec is None:
            return None
        spec = {k: v for k, v in self.build_spec.items() if k != "conv_path"}
        return spec if self.conv_path == "auto" else {**spec, "conv_path": self.conv_path}

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", conv_path={self.conv_path!r}" if self.conv_path != "auto" else "")

    def _init_projections(self) -> None:
        std = (self.num_filters * self.dim) ** -0.5
        shape = (self.num_filters, self.dim, self.dim_out)
        self.M_phi_plus = nn.Parameter(torch.randn(shape) * std)
        self.M_phi_minus = nn.Parameter(torch.randn(shape) * std)

    def _stacked_M(self) -> torch.Tensor:  # (2K, dim, dim_out): "+" filters, then "-" filters
        return torch.cat([self.M_phi_plus, self.M_phi_minus], dim=0)

    def _encoder_weight(self) -> torch.Tensor:  # (dim, 2K * dim_out)
        return self._stacked_M().permute(1, 0, 2).reshape(self.dim, -1)

    def _arrangement(self, batch: int, steps: int, length: int) -> str:
        shape = (batch, steps, length, 2 * self.num_filters, self.dim, self.dim_out)
        return stu_arrangement(self.phi.device.type, self.conv_path, *shape)

    def _sequence_conv(self, x: torch.Tensor, length: int) -> torch.Tensor:
        batch, steps, _ = x.shape
        if self._arrangement(batch, steps, length) == "project":
            return super()._sequence_conv(x, length)
        cdtype = compute_dtype(x.dtype)
        with no_autocast(x.device):
            n = fft_size(steps + length - 1)
            xf = torch.fft.rfft(x.to(cdtype).transpose(1, 2), n=n)
            xf = xf.permute(2, 0, 1).contiguous()  # (F, B, dim)
            y = kernel_mix(xf, self._kernel_spectrum(0, length, n, cdtype), self._stacked_M().to(cdtype))
            y = torch.fft.irfft(y.permute(1, 2, 0), n=n)  # (B, dim_out, n)
        return y[..., :length].transpose(1, 2)


@register_layer("stu_t")
class STUTensordot(SpectralConv):
    """STU-T, the tensordot approximation of the STU: one depthwise convolution after a projection.

    x_proj = x @ M_inputs; y[:, c] = x_proj[:, c] * kernel[:, c] (causal, lag 0 included), with the
    per-channel kernel = phi @ M_filters_plus + ((-1)^s phi) @ M_filters_minus, shape (seq_len, dim_out).

    The published code uses one filter projection for both branches, so conv(u, v) + sgn . conv(sgn . u,
    v) = conv(u, v * (1 + (-1)^s)) cancels every odd lag. Here the "-" branch has its own projection
    `M_filters_minus`, so the kernel is a full combination of [phi, (-1)^s phi].

    What an LDS conversion reads: `M_inputs` (dim, dim_out), `M_filters_plus`, `M_filters_minus`
    (num_filters, dim_out), `phi`, `seq_len`, `num_filters`, `variant`, `dim`, `dim_out`.

    Init: M_inputs ~ normal(0, dim ** -0.5), M_filters_* ~ normal(0, (2 * num_filters) ** -0.5).
    """

    depthwise = True

    def _init_projections(self) -> None:
        self.M_inputs = nn.Parameter(torch.randn(self.dim, self.dim_out) * self.dim**-0.5)
        std = (2 * self.num_filters) ** -0.5
        self.M_filters_plus = nn.Parameter(torch.randn(self.num_filters, self.dim_out) * std)
        self.M_filters_minus = nn.Parameter(torch.randn(self.num_filters, self.dim_out) * std)

    def _encoder_weight(self) -> torch.Tensor:  # (dim, dim_out)
        return self.M_inputs

    def _bank_weight(self, dtype: torch.dtype) -> torch.Tensor:  # (2K, dim_out)
        return torch.cat([self.M_filters_plus, self.M_filters_minus]).to(dtype)

    def channel_filters(self) -> torch.Tensor:
        """The per-channel kernel (seq_len, dim_out): phi @ M_filters_plus + alt(phi) @ M_filters_minus."""
        return self._kernel(self.seq_len, compute_dtype(self.M_inputs.dtype))


__all__ = ["STU", "STUTensordot", "SpectralConv"]
