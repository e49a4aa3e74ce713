"""Spectral Transform Unit layers: STU (exact, "stu") and its tensordot approximation STU-T ("stu_t").

Both convolve the input with K fixed spectral filters phi_k (see `spectralds.filters`) along two
branches: the "+" branch uses phi_k(s), the "-" branch the alternating filter (-1)^s phi_k(s). Lag 0 is
included, so y_t depends on x_0..x_t. Sequences are convolved by FFT in float32 (float64 for float64
inputs) with autocast disabled, whatever the ambient precision.

Decoding (`init_state` / `prefill` / `step`) is exact and comes in two flavours, chosen per layer
(`layer.decode`) or per call (`decode=` argument of `init_state` / `prefill`):

* ``"naive"``: the state keeps every input; each output is a direct sum over the history, O(t) per token.
* ``"futurefill"`` (Agarwal et al., "FutureFill: fast generation from convolutional sequence models",
  arXiv 2410.03766), continuous variant: `prefill` computes the prompt's contribution to every later
  position with one FFT. Generated tokens are handled by a dyadic schedule: after the r-th generated
  token, with 2^j the largest power of two dividing r, the last 2^j tokens are convolved with the
  filters at lags 1..2^(j+1)-1 and added to the next 2^j positions of a "future" buffer. Every
  (source, target) pair is counted exactly once (at the highest bit where their indices differ) before
  the target is produced, so each output is the buffer entry plus the lag-0 term: O(log^2 L) amortized
  per token. The state caches only the generated tokens (projected), not the prompt.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from spectralds.filters import spectral_filters
from spectralds.layers.registry import SequenceLayer, register_layer

DECODE_METHODS = ("futurefill", "naive")
# FutureFill blocks up to this many tokens are summed directly: on CPU that beats an FFT below ~32.
_DIRECT_BLOCK = 16


def fft_size(n: int) -> int:
    """The smallest power of two >= max(n, 2) (even, so the alternating-filter spectrum trick applies)."""
    return max(2, 1 << (n - 1).bit_length())


def alternating(length: int, start: int = 0, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """(-1)^s for s = start..start+length-1."""
    s = torch.arange(start, start + length, device=device)
    return (1 - 2 * (s % 2)).to(dtype)


@functools.lru_cache(maxsize=8)
def _cached_filters(seq_len: int, num_filters: int, variant: str) -> torch.Tensor:
    # Every layer of a model asks for the same bank: compute (or load from disk) it once per process.
    return spectral_filters(seq_len, num_filters, variant).float()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class ConvDecodeState:
    """Decoding state of an STU / STU-T layer (see the module docstring for the two methods).

    kernel, weight: the layer's kernel bank for lags 0..seq_len-1 and its per-token projection,
    snapshotted from the parameters: make a new state after changing them.
    inputs: naive: every input so far (seq_len rows); futurefill: the projected generated tokens only
    (grown by doubling). future: futurefill only, (batch, seq_len, dim_out), the contribution of all
    past tokens to each position.
    """

    method: str
    pos: int
    start: int
    kernel: torch.Tensor
    weight: torch.Tensor
    inputs: torch.Tensor
    future: torch.Tensor | None = None
    spectra: dict[int, torch.Tensor] = field(default_factory=dict)


class _SpectralConvLayer(SequenceLayer):
    """Filters, validation, FFT convolution and both decoders; subclasses supply the projections.

    A subclass defines its "encoded" inputs z (what gets convolved, after any projection that commutes
    with the convolution), its kernel bank (one column per filter or per output channel) and how
    encoded spectra/taps contract with the bank into (batch, length, dim_out).
    """

    def __init__(
        self,
        dim: int,
        seq_len: int,
        num_filters: int = 24,
        dim_out: int | None = None,
        variant: str = "hankel",
        use_hankel_L: bool = False,
        filters: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("seq_len", seq_len), ("num_filters", num_filters)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if num_filters > seq_len:
            raise ValueError(f"num_filters ({num_filters}) cannot exceed seq_len ({seq_len})")
        if dim_out is not None and (not isinstance(dim_out, int) or dim_out < 1):
            raise ValueError(f"dim_out must be a positive integer or None, got {dim_out!r}")
        if use_hankel_L:
            if variant not in ("hankel", "hankel_L"):
                raise ValueError(f"use_hankel_L=True conflicts with variant={variant!r}")
            variant = "hankel_L"
        if filters is None:
            filters = _cached_filters(seq_len, num_filters, variant)
        elif tuple(filters.shape) != (seq_len, num_filters) or not filters.is_floating_point():
            raise ValueError(
                f"filters must be a floating tensor of shape (seq_len, num_filters) = "
                f"{(seq_len, num_filters)}, got {tuple(filters.shape)} {filters.dtype}"
            )
        self.dim, self.dim_out = dim, dim_out or dim
        self.seq_len, self.num_filters, self.variant = seq_len, num_filters, variant
        self.decode = "futurefill"
        # Fixed, recomputable: not saved in checkpoints.
        self.register_buffer("phi", filters.detach().float().clone(), persistent=False)

    def _apply(self, fn, recurse=True):
        # `.half()` / `.bfloat16()` would round the filters; keep them at least float32.
        phi = self.phi
        super()._apply(fn, recurse)
        if self.phi.dtype not in (torch.float32, torch.float64):
            self.phi = phi.to(device=self.phi.device, dtype=torch.float32)
        return self

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, dim_out={self.dim_out}, seq_len={self.seq_len}, "
            f"num_filters={self.num_filters}, variant={self.variant!r}"
        )

    # ---- subclass hooks -------------------------------------------------------------------------
    def _encoder_weight(self) -> torch.Tensor:
        """The projection applied before the convolution: (dim, encoded width)."""
        raise NotImplementedError

    def _encode(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, dim) -> encoded inputs (B, T, ...), in the ambient (autocast) precision."""
        weight = self._encoder_weight() if weight is None else weight
        return x @ weight.to(x.dtype)

    def _kernel(self, length: int, dtype: torch.dtype) -> torch.Tensor:
        """Kernel bank for lags 0..length-1: (length, columns)."""
        raise NotImplementedError

    def _contract(self, z: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        """Encoded spectra (B, F, ...) times kernel spectra (F, columns) -> (B, F, dim_out)."""
        raise NotImplementedError

    def _contract_taps(self, z: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
        """Encoded inputs (B, m, ...) and taps (U, m, columns), summed over m -> (B, U, dim_out)."""
        raise NotImplementedError

    def _kernel_spectrum(self, lo: int, hi: int, n: int, dtype: torch.dtype) -> torch.Tensor:
        """rfft, zero-padded to n, of the kernel bank at lags lo..hi-1: (n // 2 + 1, columns)."""
        return torch.fft.rfft(self._kernel(hi, dtype)[lo:], n=n, dim=0)

    # ---- convolution ----------------------------------------------------------------------------
    def _fill_fft(
        self, z: torch.Tensor, start: int, length: int, spectrum: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Outputs at positions start..start+length-1 of the encoded inputs z at positions 0..m-1."""
        m = z.shape[1]
        lo = max(0, start - m + 1)  # smallest lag that occurs
        n = fft_size(m + length - 1)  # no circular wrap-around reaches the kept outputs
        if spectrum is None:
            spectrum = self._kernel_spectrum(lo, start + length, n, z.dtype)
        y = torch.fft.irfft(self._contract(torch.fft.rfft(z, n=n, dim=1), spectrum), n=n, dim=1)
        return y[:, start - lo : start - lo + length]

    def _fill_direct(self, z: torch.Tensor, start: int, length: int, kernel: torch.Tensor) -> torch.Tensor:
        """Same as `_fill_fft` by a direct (Toeplitz) sum; `kernel` covers lags 0..start+length-1."""
        m = z.shape[1]
        lags = start + torch.arange(length, device=z.device)[:, None] - torch.arange(m, device=z.device)
        taps = kernel[lags.clamp_min(0)] * (lags >= 0)[..., None].to(kernel.dtype)  # (length, m, columns)
        return self._contract_taps(z, taps)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected input of shape (batch, seq, {self.dim}), got {tuple(x.shape)}")
        if x.shape[1] > self.seq_len:
            raise ValueError(
                f"sequence length {x.shape[1]} exceeds the layer's seq_len {self.seq_len} "
                "(the length of its filters)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        batch, length, _ = x.shape
        if length == 0:
            return x.new_zeros(batch, 0, self.dim_out)
        z = self._encode(x)
        with torch.autocast(x.device.type, enabled=False):
            y = self._fill_fft(z.to(_compute_dtype(x.dtype)), 0, length)
        return y.to(x.dtype)

    # ---- decoding -------------------------------------------------------------------------------
    def _method(self, decode: str | None) -> str:
        method = decode or self.decode
        if method not in DECODE_METHODS:
            raise ValueError(f"unknown decode method {method!r}; expected one of {DECODE_METHODS}")
        return method

    def _naive_weight(self) -> torch.Tensor:
        """The weight the naive decoder uses per token (default: the encoder's)."""
        return self._encoder_weight()

    def _naive_encode(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """What the naive decoder stores per token (default: the encoded input)."""
        return self._encode(x, weight)

    def _naive_output(self, history: torch.Tensor, kernel: torch.Tensor, weight: torch.Tensor):
        """Output at the last position of `history` (B, t+1, ...): (B, dim_out)."""
        return self._fill_direct(history, history.shape[1] - 1, 1, kernel)[:, 0]

    @torch.no_grad()
    def init_state(
        self,
        batch_size: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        decode: str | None = None,
    ) -> ConvDecodeState:
        """An empty state; `dtype` is the activations' dtype (buffers use float32, or float64 for it)."""
        method = self._method(decode)
        device = self.phi.device if device is None else torch.device(device)
        cdtype = _compute_dtype(dtype or self.phi.dtype)
        with torch.autocast(device.type, enabled=False):
            kernel = self._kernel(self.seq_len, cdtype).to(device)
        probe = torch.zeros(batch_size, 1, self.dim, device=device, dtype=cdtype)
        if method == "naive":
            weight = self._naive_weight().to(device)
            width = self._naive_encode(probe, weight).shape[2:]
            inputs = torch.zeros(batch_size, self.seq_len, *width, device=device, dtype=cdtype)
            return ConvDecodeState(method, 0, 0, kernel, weight, inputs)
        weight = self._encoder_weight().to(device)
        width = self._encode(probe, weight).shape[2:]
        inputs = torch.zeros(batch_size, min(self.seq_len, 16), *width, device=device, dtype=cdtype)
        future = torch.zeros(batch_size, self.seq_len, self.dim_out, device=device, dtype=cdtype)
        return ConvDecodeState(method, 0, 0, kernel, weight, inputs, future)

    @torch.no_grad()
    def prefill(self, x: torch.Tensor, decode: str | None = None) -> tuple[torch.Tensor, ConvDecodeState]:
        """Outputs for a prompt x (B, P, dim) and the state after it, in one FFT pass (no autograd)."""
        self._check_input(x)
        batch, length, _ = x.shape
        state = self.init_state(batch, x.device, x.dtype, decode)
        if length == 0:
            return x.new_zeros(batch, 0, self.dim_out), state
        cdtype = state.kernel.dtype
        if state.method == "naive":
            state.inputs[:, :length] = self._naive_encode(x, state.weight).to(cdtype)
            y = self.forward(x)
        else:
            # One FFT gives the prompt's outputs and its contribution to every later position.
            z = self._encode(x, state.weight)
            with torch.autocast(x.device.type, enabled=False):
                state.future = self._fill_fft(z.to(cdtype), 0, self.seq_len)
            y = state.future[:, :length].to(x.dtype)
            state.inputs = state.inputs[:, : min(16, self.seq_len - length)]
        state.pos = state.start = length
        return y, state

    @torch.no_grad()
    def step(self, x_t: torch.Tensor, state: ConvDecodeState) -> tuple[torch.Tensor, ConvDecodeState]:
        """One token x_t (B, dim) -> (y_t (B, dim_out), state), as `forward` would give it (no autograd)."""
        if x_t.dim() != 2 or x_t.shape[-1] != self.dim or x_t.shape[0] != state.inputs.shape[0]:
            raise ValueError(
                f"expected x_t of shape ({state.inputs.shape[0]}, {self.dim}), got {tuple(x_t.shape)}"
            )
        t = state.pos
        if t >= self.seq_len:
            raise ValueError(f"cannot decode past seq_len={self.seq_len}: the filters have no longer lags")
        cdtype = state.kernel.dtype
        if state.method == "naive":
            state.inputs[:, t] = self._naive_encode(x_t[:, None], state.weight)[:, 0].to(cdtype)
            with torch.autocast(x_t.device.type, enabled=False):
                y = self._naive_output(state.inputs[:, : t + 1], state.kernel, state.weight)
        else:
            z_t = self._encode(x_t[:, None], state.weight).to(cdtype)
            with torch.autocast(x_t.device.type, enabled=False):
                y = state.future[:, t] + self._fill_direct(z_t, 0, 1, state.kernel)[:, 0]
                self._futurefill_update(state, z_t)
        state.pos = t + 1
        return y.to(x_t.dtype), state

    def _futurefill_update(self, state: ConvDecodeState, z_t: torch.Tensor) -> None:
        t, r = state.pos, state.pos - state.start  # r: index of this token among the generated ones
        if r >= state.inputs.shape[1]:  # grow the cache of generated tokens by doubling
            grown = state.inputs.new_zeros(
                state.inputs.shape[0], min(2 * state.inputs.shape[1], self.seq_len - state.start),
                *state.inputs.shape[2:],
            )
            grown[:, : state.inputs.shape[1]] = state.inputs
            state.inputs = grown
        state.inputs[:, r] = z_t[:, 0]
        count = r + 1
        block = count & -count  # largest power of two dividing count
        targets = min(block, self.seq_len - 1 - t)
        if targets <= 0:
            return
        src = state.inputs[:, count - block : count]
        if block <= _DIRECT_BLOCK:
            contribution = self._fill_direct(src, block, targets, state.kernel)
        else:
            spectrum = state.spectra.get(block) if targets == block else None
            if spectrum is None:
                n = fft_size(block + targets - 1)
                spectrum = torch.fft.rfft(state.kernel[1 : block + targets], n=n, dim=0)
                if targets == block:
                    state.spectra[block] = spectrum
            contribution = self._fill_fft(src, block, targets, spectrum)
        state.future[:, t + 1 : t + 1 + targets] += contribution


@register_layer("stu")
class STU(_SpectralConvLayer):
    """Exact Spectral Transform Unit.

    y = sum_k (phi_k * x) M_phi_plus[k] + ((-1)^s phi_k * x) M_phi_minus[k], with * the causal
    convolution over time per input channel (lag 0 included) and phi = `self.phi` (seq_len, K).

    What an LDS conversion reads: `M_phi_plus`, `M_phi_minus` (num_filters, dim, dim_out), `phi`,
    `seq_len`, `num_filters`, `variant`, `dim`, `dim_out`. An LDS whose 2K impulse responses reproduce
    [phi, (-1)^s phi] (lag 0 included) replaces the convolution exactly; M stays as it is.

    Init: M ~ normal(0, std = (num_filters * dim) ** -0.5).
    Sequences use "project first": z = x @ M (one (dim, 2K*dim_out) matmul), then one FFT per
    (filter, output channel) and a sum over filters in frequency space, so only (B, T, dim) is saved
    for backward. The "-" filter's spectrum is the "+" one shifted by n/2 (since (-1)^s = e^{i pi s}),
    i.e. the reversed conjugate rfft: no extra filter FFT.
    """

    def __init__(
        self,
        dim: int,
        seq_len: int,
        num_filters: int = 24,
        dim_out: int | None = None,
        variant: str = "hankel",
        use_hankel_L: bool = False,
        filters: torch.Tensor | None = None,
    ) -> None:
        super().__init__(dim, seq_len, num_filters, dim_out, variant, use_hankel_L, filters)
        std = (num_filters * dim) ** -0.5
        self.M_phi_plus = nn.Parameter(torch.randn(num_filters, dim, self.dim_out) * std)
        self.M_phi_minus = nn.Parameter(torch.randn(num_filters, dim, self.dim_out) * std)

    def _stacked_M(self) -> torch.Tensor:  # (2K, dim, dim_out): "+" filters, then "-" filters
        return torch.cat([self.M_phi_plus, self.M_phi_minus], dim=0)

    def _encoder_weight(self) -> torch.Tensor:  # (dim, 2K * dim_out)
        return self._stacked_M().permute(1, 0, 2).reshape(self.dim, -1)

    def _encode(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        z = super()._encode(x, weight)
        return z.unflatten(-1, (2 * self.num_filters, self.dim_out))  # (B, T, 2K, dim_out)

    def _kernel(self, length: int, dtype: torch.dtype) -> torch.Tensor:  # (length, 2K): [phi, alt phi]
        phi = self.phi[:length].to(dtype)
        return torch.cat([phi, phi * alternating(length, 0, dtype, phi.device)[:, None]], dim=1)

    def _kernel_spectrum(self, lo: int, hi: int, n: int, dtype: torch.dtype) -> torch.Tensor:
        plus = torch.fft.rfft(self.phi[lo:hi].to(dtype), n=n, dim=0)
        # (-1)^(lo + s) phi(lo + s) has spectrum (-1)^lo * plus(f + n/2) = (-1)^lo * conj(plus(n/2 - f)).
        minus = plus.flip(0).conj() * (-1) ** lo
        return torch.cat([plus, minus], dim=1)

    def _contract(self, z: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bfko,fk->bfo", z, bank)

    def _contract_taps(self, z: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bjko,ujk->buo", z, taps)

    # The naive decoder keeps raw inputs (dim per token, not 2K * dim_out) and projects per output.
    def _naive_weight(self) -> torch.Tensor:  # (2K * dim, dim_out)
        return self._stacked_M().flatten(0, 1)

    def _naive_encode(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x

    def _naive_output(self, history: torch.Tensor, kernel: torch.Tensor, weight: torch.Tensor):
        taps = kernel[: history.shape[1]].flip(0)  # lag t - j for history position j
        u = torch.einsum("jk,bjd->bkd", taps, history)
        return u.flatten(1) @ weight.to(u.dtype)


@register_layer("stu_t")
class STUTensordot(_SpectralConvLayer):
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

    def __init__(
        self,
        dim: int,
        seq_len: int,
        num_filters: int = 24,
        dim_out: int | None = None,
        variant: str = "hankel",
        use_hankel_L: bool = False,
        filters: torch.Tensor | None = None,
    ) -> None:
        super().__init__(dim, seq_len, num_filters, dim_out, variant, use_hankel_L, filters)
        self.M_inputs = nn.Parameter(torch.randn(dim, self.dim_out) * dim**-0.5)
        std = (2 * num_filters) ** -0.5
        self.M_filters_plus = nn.Parameter(torch.randn(num_filters, self.dim_out) * std)
        self.M_filters_minus = nn.Parameter(torch.randn(num_filters, self.dim_out) * std)

    def _encoder_weight(self) -> torch.Tensor:  # (dim, dim_out)
        return self.M_inputs

    def _kernel(self, length: int, dtype: torch.dtype) -> torch.Tensor:  # (length, dim_out)
        phi = self.phi[:length].to(dtype)
        alt = phi * alternating(length, 0, dtype, phi.device)[:, None]
        return phi @ self.M_filters_plus.to(dtype) + alt @ self.M_filters_minus.to(dtype)

    def kernel(self) -> torch.Tensor:
        """The per-channel kernel (seq_len, dim_out): phi @ M_filters_plus + alt(phi) @ M_filters_minus."""
        return self._kernel(self.seq_len, _compute_dtype(self.M_inputs.dtype))

    def _contract(self, z: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        return z * bank

    def _contract_taps(self, z: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bjo,ujo->buo", z, taps)


__all__ = ["DECODE_METHODS", "STU", "STUTensordot", "ConvDecodeState", "alternating", "fft_size"]
