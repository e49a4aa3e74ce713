"""Spectral Transform Unit layers: STU (exact, "stu") and its tensordot approximation STU-T ("stu_t").

Both convolve the input with K fixed spectral filters phi_k (see `spectralds.filters`) along two
branches: the "+" branch uses phi_k(s), the "-" branch the alternating filter (-1)^s phi_k(s). Lag 0 is
included, so y_t depends on x_0..x_t. Convolutions run by FFT in float32 (float64 for float64 inputs)
with autocast disabled, whatever the ambient precision; projections before them follow autocast.

Decoding (`init_state` / `prefill` / `step`, inference only: no autograd) is exact and comes in two
flavours, chosen per layer (`layer.decode`) or per call (`decode=` of `init_state` / `prefill`):

* ``"naive"``: the state keeps every input; each output is a direct sum over the history, O(t) per token.
* ``"futurefill"`` (Agarwal et al., "FutureFill: fast generation from convolutional sequence models",
  arXiv 2410.03766), continuous variant: `prefill` computes the prompt's contribution to every later
  position with one FFT. Generated tokens follow a dyadic schedule: after the r-th generated token,
  with 2^j the largest power of two dividing r, the last 2^j tokens are convolved with the filters at
  lags 1..2^(j+1)-1 and added to the next 2^j positions of a "future" buffer. Each (source, target)
  pair is added exactly once (at the highest bit where their indices differ) before the target is
  produced, so an output is its buffer entry plus the lag-0 term: O(log^2 L) amortized per token. The
  state caches the generated tokens (after the input projection), never the prompt.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from spectralds.errors import UserError
from spectralds.filters import spectral_filters
from spectralds.io import cache_dir
from spectralds.layers.registry import SequenceLayer, check_positive_int, register_layer

DECODE_METHODS = ("futurefill", "naive")
_DIRECT_BLOCK = 16  # FutureFill blocks up to this many tokens are summed directly (faster than an FFT)
_INITIAL_CACHE = 16  # first capacity of FutureFill's cache of generated tokens; it doubles as needed
_KERNEL_CHUNK_BYTES = 1 << 27  # frequency-domain STU kernels are built this many bytes at a time


def fft_size(n: int) -> int:
    """The smallest power of two >= max(n, 2) (even, as the alternating-filter spectrum trick needs)."""
    return max(2, 1 << (n - 1).bit_length())


def alternating(length: int, start: int = 0, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """(-1)^s for s = start..start+length-1."""
    s = torch.arange(start, start + length, device=device)
    return (1 - 2 * (s % 2)).to(dtype)


def _cached_filters(seq_len: int, num_filters: int, variant: str) -> torch.Tensor:
    # Keyed on the cache directory too: a process that switches SPECTRALDS_CACHE_DIR reads that cache.
    return _memo_filters(str(cache_dir()), seq_len, num_filters, variant)


@functools.lru_cache(maxsize=8)
def _memo_filters(directory: str, seq_len: int, num_filters: int, variant: str) -> torch.Tensor:
    # Every layer of a model asks for the same bank: compute (or load from disk) it once per process.
    return spectral_filters(seq_len, num_filters, variant).float()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _no_autocast(device: torch.device):
    return torch.autocast(device.type, enabled=False)


class _RealFFT(torch.autograd.Function):
    """torch.fft.rfft(z, n) along the last dim, with a backward by one inverse real FFT.

    PyTorch differentiates rfft through a zero-padded complex FFT and several full-size copies, which
    made it the slowest step of the STU backward. For real z: dL/dz_t = Re(sum_f g_f e^{2 pi i f t / n})
    over the rfft bins f = 0..n/2, i.e. (n / 2) irfft(g) plus half the real parts of the two unpaired
    bins (0 and n/2), which irfft counts once instead of twice.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, n: int) -> torch.Tensor:
        ctx.length, ctx.n = z.shape[-1], n
        return torch.fft.rfft(z, n=n)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        length, n = ctx.length, ctx.n
        grad = torch.fft.irfft(g, n=n, norm="forward")[..., :length]  # n * irfft(g)
        edges = g[..., :1].real + g[..., -1:].real * alternating(length, 0, grad.dtype, grad.device)
        return torch.add(grad, edges).mul_(0.5), None


@dataclass
class ConvDecodeState:
    """Decoding state of an STU / STU-T layer (see the module docstring for the two methods).

    kernel, weight: the layer's kernel bank for lags 0..seq_len-1 and its per-token projection,
    snapshotted from the parameters: make a new state after changing them.
    inputs: naive: every input so far, (batch, seq_len, width), in reversed time order; futurefill: the
    projected generated tokens only, (batch, ..., capacity), time last (capacity doubles as needed).
    future: futurefill only, (batch, seq_len, dim_out): the contribution of past tokens to each position.
    """

    method: str
    pos: int
    start: int
    kernel: torch.Tensor
    weight: torch.Tensor
    inputs: torch.Tensor
    future: torch.Tensor | None = None
    cache: dict[tuple, torch.Tensor] = field(default_factory=dict)  # futurefill: taps and spectra


class _SpectralConvLayer(SequenceLayer):
    """Filters, validation, FFT convolution and both decoders; subclasses supply the projections.

    A subclass defines its encoded inputs z (the input after the projection that commutes with the
    convolution, time last), its kernel bank (one column per filter or per output channel) and how
    encoded spectra or time-domain taps contract with the bank into dim_out channels.
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
            check_positive_int(name, value)
        if num_filters > seq_len:
            raise UserError(f"num_filters ({num_filters}) cannot exceed seq_len ({seq_len})")
        check_positive_int("dim_out", dim_out, optional=True)
        if use_hankel_L:
            if variant not in ("hankel", "hankel_L"):
                raise UserError(f"use_hankel_L=True conflicts with variant={variant!r}")
            variant = "hankel_L"
        if filters is None:
            filters = _cached_filters(seq_len, num_filters, variant)
        elif tuple(filters.shape) != (seq_len, num_filters) or not filters.is_floating_point():
            raise UserError(
                f"filters must be a floating tensor of shape (seq_len, num_filters) = "
                f"{(seq_len, num_filters)}, got {tuple(filters.shape)} {filters.dtype}"
            )
        self.dim, self.dim_out = dim, dim_out or dim
        self.seq_len, self.num_filters, self.variant = seq_len, num_filters, variant
        self.decode = "futurefill"
        # Fixed and recomputable, so not saved in checkpoints.
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
        """(B, T, dim) -> encoded inputs (B, ..., T), time last, in the ambient (autocast) precision."""
        weight = self._encoder_weight() if weight is None else weight
        return torch.matmul(weight.to(x.dtype).T, x.transpose(1, 2))

    def _kernel(self, length: int, dtype: torch.dtype) -> torch.Tensor:
        """Kernel bank at lags 0..length-1: (length, columns)."""
        raise NotImplementedError

    def _kernel_spectrum(self, lo: int, hi: int, n: int, dtype: torch.dtype) -> torch.Tensor:
        """rfft, zero-padded to n, of the kernel bank at lags lo..hi-1: (n // 2 + 1, columns)."""
        return torch.fft.rfft(self._kernel(hi, dtype)[lo:], n=n, dim=0)

    def _contract(self, zf: torch.Tensor, spectrum: torch.Tensor) -> torch.Tensor:
        """Encoded spectra (B, ..., F) times kernel spectra (F, columns) -> (B, dim_out, F)."""
        raise NotImplementedError

    def _contract_taps(self, z: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
        """Encoded inputs (B, ..., m) and taps (U, m, columns), summed over m -> (B, U, dim_out)."""
        raise NotImplementedError

    def _sequence_conv(self, x: torch.Tensor, length: int) -> torch.Tensor:
        """Outputs at positions 0..length-1 (length >= T) for inputs x (B, T, dim), in compute dtype."""
        z = self._encode(x)
        with _no_autocast(x.device):
            return self._fill_fft(z.to(_compute_dtype(x.dtype)), 0, length)

    # ---- convolution ----------------------------------------------------------------------------
    def _fill_fft(
        self, z: torch.Tensor, start: int, length: int, spectrum: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Outputs at positions start..start+length-1 from encoded inputs z at positions 0..m-1."""
        m = z.shape[-1]
        lo = max(0, start - m + 1)  # smallest lag that occurs
        n = fft_size(m + length - 1)  # large enough that no circular wrap-around reaches kept outputs
        if spectrum is None:
            spectrum = self._kernel_spectrum(lo, start + length, n, z.dtype)
        y = torch.fft.irfft(self._contract(_RealFFT.apply(z, n), spectrum), n=n)
        return y[..., start - lo : start - lo + length].transpose(1, 2)

    @staticmethod
    def _toeplitz_taps(kernel: torch.Tensor, start: int, length: int, m: int) -> torch.Tensor:
        """Taps (length, m, columns) for outputs at start..start+length-1 from inputs at 0..m-1."""
        steps = torch.arange(max(length, m), device=kernel.device)
        lags = start + steps[:length, None] - steps[:m]
        return kernel[lags.clamp_min(0)] * (lags >= 0)[..., None].to(kernel.dtype)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise UserError(f"expected input of shape (batch, seq, {self.dim}), got {tuple(x.shape)}")
        if x.shape[1] > self.seq_len:
            raise UserError(
                f"sequence length {x.shape[1]} exceeds the layer's seq_len {self.seq_len} "
                "(the length of its filters)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if x.shape[1] == 0:
            return x.new_zeros(x.shape[0], 0, self.dim_out)
        return self._sequence_conv(x, x.shape[1]).to(x.dtype)

    # ---- decoding -------------------------------------------------------------------------------
    def _method(self, decode: str | None) -> str:
        method = decode or self.decode
        if method not in DECODE_METHODS:
            raise UserError(f"unknown decode method {method!r}; expected one of {DECODE_METHODS}")
        return method

    def _naive_weight(self) -> torch.Tensor:
        """The weight the naive decoder uses per token (default: the encoder's)."""
        return self._encoder_weight()

    def _naive_encode(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """What the naive decoder stores per token: (B, T, width), time first."""
        raise NotImplementedError

    def _naive_output(self, history: torch.Tensor, kernel: torch.Tensor, weight: torch.Tensor):
        """Output at time t from `history` (B, t+1, width) in REVERSED time order (row j holds token
        t - j, so it pairs with kernel row j, lag j): (B, dim_out)."""
        raise NotImplementedError

    @torch.no_grad()
    def init_state(
        self,
        batch_size: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        decode: str | None = None,
    ) -> ConvDecodeState:
        """An empty state; `dtype` is the activations' dtype (buffers are float32, float64 for float64)."""
        method = self._method(decode)
        device = self.phi.device if device is None else torch.device(device)
        cdtype = _compute_dtype(dtype or self.phi.dtype)
        with _no_autocast(device):
            kernel = self._kernel(self.seq_len, cdtype).to(device)
        probe = torch.zeros(batch_size, 1, self.dim, device=device, dtype=cdtype)
        if method == "naive":
            weight = self._naive_weight().to(device)
            width = self._naive_encode(probe, weight).shape[-1]
            # Stored in reversed time (token t at row seq_len-1-t), so the newest t+1 rows line up
            # with kernel lags 0..t without a flip.
            inputs = torch.zeros(batch_size, self.seq_len, width, device=device, dtype=cdtype)
            return ConvDecodeState(method, 0, 0, kernel, weight, inputs)
        weight = self._encoder_weight().to(device)
        width = self._encode(probe, weight).shape[1:-1]
        capacity = min(self.seq_len, _INITIAL_CACHE)
        inputs = torch.zeros(batch_size, *width, capacity, device=device, dtype=cdtype)
        future = torch.zeros(batch_size, self.seq_len, self.dim_out, device=device, dtype=cdtype)
        return ConvDecodeState(method, 0, 0, kernel, weight, inputs, future)

    @torch.no_grad()
    def prefill(self, x: torch.Tensor, decode: str | None = None) -> tuple[torch.Tensor, ConvDecodeState]:
        """Outputs for a prompt x (B, P, dim) and the state after it, by one FFT pass."""
        self._check_input(x)
        batch, length, _ = x.shape
        state = self.init_state(batch, x.device, x.dtype, decode)
        if length == 0:
            return x.new_zeros(batch, 0, self.dim_out), state
        if state.method == "naive":
            history = self._naive_encode(x, state.weight).flip(1)
            state.inputs[:, self.seq_len - length :] = history.to(state.inputs.dtype)
            y = self.forward(x)
        else:
            # One FFT gives the prompt's outputs and its contribution to every later position.
            state.future = self._sequence_conv(x, self.seq_len).clone()  # own compact storage, not a view
            y = state.future[:, :length].to(x.dtype)
            state.inputs = state.inputs[..., : min(_INITIAL_CACHE, self.seq_len - length)]
        state.pos = state.start = length
        return y, state

    @torch.no_grad()
    def step(self, x_t: torch.Tensor, state: ConvDecodeState) -> tuple[torch.Tensor, ConvDecodeState]:
        """One token x_t (B, dim) -> (y_t (B, dim_out), state), as `forward` would give it."""
        batch = state.inputs.shape[0]
        if x_t.dim() != 2 or x_t.shape != (batch, self.dim):
            raise UserError(f"expected x_t of shape ({batch}, {self.dim}), got {tuple(x_t.shape)}")
        t = state.pos
        if t >= self.seq_len:
            raise UserError(f"cannot decode past seq_len={self.seq_len}: the filters have no longer lags")
        cdtype = state.kernel.dtype
        row = self.seq_len - 1 - t
        if state.method == "naive":
            state.inputs[:, row] = self._naive_encode(x_t[:, None], state.weight)[:, 0].to(cdtype)
            with _no_autocast(x_t.device):
                y = self._naive_output(state.inputs[:, row:], state.kernel, state.weight)
        else:
            z_t = self._encode(x_t[:, None], state.weight).to(cdtype)
            with _no_autocast(x_t.device):
                y = state.future[:, t] + self._contract_taps(z_t, self._cached_taps(state, 0, 1, 1))[:, 0]
                self._futurefill_update(state, z_t)
        state.pos = t + 1
        return y.to(x_t.dtype), state

    def _futurefill_update(self, state: ConvDecodeState, z_t: torch.Tensor) -> None:
        t, r = state.pos, state.pos - state.start  # r: index of this token among the generated ones
        capacity = state.inputs.shape[-1]
        if r >= capacity:
            grown = state.inputs.new_zeros(
                *state.inputs.shape[:-1], min(2 * capacity, self.seq_len - state.start)
            )
            grown[..., :capacity] = state.inputs
            state.inputs = grown
        state.inputs[..., r] = z_t[..., 0]
        count = r + 1
        block = count & -count  # the largest power of two dividing count
        targets = min(block, self.seq_len - 1 - t)
        if targets <= 0:
            return
        src = state.inputs[..., count - block : count]  # tokens t-block+1..t, for positions t+1..t+targets
        if block <= _DIRECT_BLOCK:
            contribution = self._contract_taps(src, self._cached_taps(state, block, targets, block))
        else:
            key = ("spectrum", block, targets)
            if key not in state.cache:
                n = fft_size(block + targets - 1)
                state.cache[key] = torch.fft.rfft(state.kernel[1 : block + targets], n=n, dim=0)
            contribution = self._fill_fft(src, block, targets, state.cache[key])
        state.future[:, t + 1 : t + 1 + targets] += contribution

    def _cached_taps(self, state: ConvDecodeState, start: int, length: int, m: int) -> torch.Tensor:
        key = ("taps", start, length, m)
        if key not in state.cache:
            state.cache[key] = self._toeplitz_taps(state.kernel, start, length, m)
        return state.cache[key]


def _frequency_kernel(spectrum: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """W(f) = sum_k spectrum[f, k] m[k] for a chunk of frequencies: (F, dim, dim_out), complex."""
    m_flat = m.flatten(1)
    return torch.complex(spectrum.real @ m_flat, spectrum.imag @ m_flat).view(-1, *m.shape[1:])


class _KernelMix(torch.autograd.Function):
    """Y(f) = X(f) @ W(f) with W(f) = sum_k S[f, k] M[k], a few frequencies at a time.

    Only X, S and M are saved: backward rebuilds each chunk of W instead of keeping all F of them
    (F * dim * dim_out complex numbers). S is a constant (no gradient).
    """

    @staticmethod
    def forward(ctx, xf: torch.Tensor, spectrum: torch.Tensor, m: torch.Tensor, chunk: int) -> torch.Tensor:
        ctx.save_for_backward(xf, spectrum, m)
        ctx.chunk = chunk
        pieces = [
            torch.bmm(xf[f : f + chunk], _frequency_kernel(spectrum[f : f + chunk], m))
            for f in range(0, xf.shape[0], chunk)
        ]
        return torch.cat(pieces)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        xf, spectrum, m = ctx.saved_tensors
        grad = grad.contiguous()  # it arrives permuted from the inverse FFT; strided complex bmm is slow
        grad_x = torch.empty_like(xf) if ctx.needs_input_grad[0] else None
        grad_m = torch.zeros_like(m) if ctx.needs_input_grad[2] else None
        for f in range(0, xf.shape[0], ctx.chunk):
            part = slice(f, f + ctx.chunk)
            if grad_x is not None:  # complex matmul rule: dX = dY W^H
                w = _frequency_kernel(spectrum[part], m)
                grad_x[part] = torch.bmm(grad[part].conj(), w.transpose(1, 2)).conj()
            if grad_m is not None:  # dW = X^H dY; W = S_re M + i S_im M with M real
                grad_w = torch.bmm(xf[part].mH, grad[part]).flatten(1)
                s = spectrum[part]
                grad_m += (s.real.T @ grad_w.real + s.imag.T @ grad_w.imag).view_as(m)
        return grad_x, None, grad_m, None


class _FilterSum(torch.autograd.Function):
    """y[b, o, f] = sum_k zf[b, k, o, f] * spectrum[f, k] (spectrum constant).

    Forward is a loop of fused multiply-adds (an einsum copies zf, the largest tensor, into a batched
    matmul layout, several times slower); backward is one broadcast product (autograd through the loop
    would build a zf-sized gradient per filter).
    """

    @staticmethod
    def forward(ctx, zf: torch.Tensor, spectrum: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(spectrum)
        spectrum = spectrum.T
        y = zf[:, 0] * spectrum[0]
        for k in range(1, zf.shape[1]):
            y.addcmul_(zf[:, k], spectrum[k])
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (spectrum,) = ctx.saved_tensors
        return grad[:, None] * spectrum.T.conj()[:, None], None


@register_layer("stu")
class STU(_SpectralConvLayer):
    """Exact Spectral Transform Unit.

    y = sum_k (phi_k * x) M_phi_plus[k] + ((-1)^s phi_k * x) M_phi_minus[k], with * the causal
    convolution over time per input channel (lag 0 included) and phi = `self.phi` (seq_len, K).

    What an LDS conversion reads: `M_phi_plus`, `M_phi_minus` (num_filters, dim, dim_out), `phi`,
    `seq_len`, `num_filters`, `variant`, `dim`, `dim_out`. An LDS whose 2K impulse responses reproduce
    [phi, (-1)^s phi] (lag 0 included) replaces the convolution exactly; M stays as it is.

    Init: M_phi_plus, M_phi_minus ~ normal(0, std = (num_filters * dim) ** -0.5).

    Sequences take whichever of two exact arrangements costs fewer flops for the shape at hand:
    * kernel: the per-frequency (dim, dim_out) kernel W(f) = sum_k S_k(f) M_k is built from the K filter
      spectra (two real matmuls, a chunk of frequencies at a time, rebuilt in backward), then each input
      spectrum is multiplied by W(f). Its cost does not grow with the batch; usually the faster one.
    * project: z = x @ M (one (dim, 2K * dim_out) matmul), one FFT per (filter, output channel), a sum
      over filters in frequency space and dim_out inverse FFTs. Cheaper for batch 1-2.
    The "-" filter's spectrum is the "+" one shifted by n/2 (as (-1)^s = e^{i pi s}): for an rfft, the
    reversed conjugate, so no extra filter FFT.
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
        return z.unflatten(1, (2 * self.num_filters, self.dim_out))  # (B, 2K, dim_out, T)

    def _kernel(self, length: int, dtype: torch.dtype) -> torch.Tensor:  # (length, 2K): [phi, alt phi]
        phi = self.phi[:length].to(dtype)
        return torch.cat([phi, phi * alternating(length, 0, dtype, phi.device)[:, None]], dim=1)

    def _kernel_spectrum(self, lo: int, hi: int, n: int, dtype: torch.dtype) -> torch.Tensor:
        plus = torch.fft.rfft(self.phi[lo:hi].to(dtype), n=n, dim=0)
        # (-1)^(lo + s) phi(lo + s) has spectrum (-1)^lo * plus(f + n/2) = (-1)^lo * conj(plus(n/2 - f)).
        minus = plus.flip(0).conj() * (-1) ** lo
        return torch.cat([plus, minus], dim=1)

    def _contract(self, zf: torch.Tensor, spectrum: torch.Tensor) -> torch.Tensor:
        return _FilterSum.apply(zf, spectrum)

    def _contract_taps(self, z: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
        # One matmul: (B, dim_out, 2K * m) @ (2K * m, U).
        z = z.transpose(1, 2).flatten(2)
        return (z @ taps.permute(2, 1, 0).flatten(0, 1)).transpose(1, 2)

    # "auto" picks by the flop estimate below; "kernel" / "project" pin one (benchmarks, GPU tuning).
    conv_path: str = "auto"

    def _kernel_path_is_cheaper(self, batch: int, steps: int, length: int) -> bool:
        if self.conv_path != "auto":
            return self.conv_path == "kernel"
        n = fft_size(steps + length - 1)
        freqs, cols, dd = n // 2 + 1, 2 * self.num_filters, self.dim * self.dim_out
        kernel = 2 * freqs * cols * dd + 4 * batch * freqs * dd  # build W(f), then B matmuls per f
        fft_flops = 2.5 * n * math.log2(n)
        project = batch * (steps * cols * dd + cols * self.dim_out * (fft_flops + 4 * freqs))
        return kernel < project

    def _sequence_conv(self, x: torch.Tensor, length: int) -> torch.Tensor:
        batch, steps, _ = x.shape
        if not self._kernel_path_is_cheaper(batch, steps, length):
            return super()._sequence_conv(x, length)
        cdtype = _compute_dtype(x.dtype)
        with _no_autocast(x.device):
            n = fft_size(steps + length - 1)
            spectrum = self._kernel_spectrum(0, length, n, cdtype)  # (F, 2K)
            xf = torch.fft.rfft(x.to(cdtype).transpose(1, 2), n=n)
            xf = xf.permute(2, 0, 1).contiguous()  # (F, B, dim)
            m = self._stacked_M().to(cdtype)
            # W(f) is complex (dim, dim_out); the factor 2 leaves room for its real and imaginary parts.
            chunk = max(1, _KERNEL_CHUNK_BYTES // (2 * m[0].numel() * xf.element_size()))
            y = _KernelMix.apply(xf, spectrum, m, chunk)  # (F, B, dim_out)
            y = torch.fft.irfft(y.permute(1, 2, 0), n=n)  # (B, dim_out, n)
        return y[..., :length].transpose(1, 2)

    # The naive decoder keeps raw inputs (dim per token, not 2K * dim_out) and projects per output.
    def _naive_weight(self) -> torch.Tensor:  # (2K * dim, dim_out)
        return self._stacked_M().flatten(0, 1)

    def _naive_encode(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x

    def _naive_output(self, history: torch.Tensor, kernel: torch.Tensor, weight: torch.Tensor):
        u = kernel[: history.shape[1]].T @ history  # (B, 2K, dim)
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

    def _contract(self, zf: torch.Tensor, spectrum: torch.Tensor) -> torch.Tensor:
        return zf * spectrum.T

    def _contract_taps(self, z: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
        return (z[:, None] * taps.permute(0, 2, 1)).sum(-1)

    def _naive_encode(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x @ weight.to(x.dtype)

    def _naive_output(self, history: torch.Tensor, kernel: torch.Tensor, weight: torch.Tensor):
        return (history * kernel[: history.shape[1]]).sum(1)


__all__ = ["DECODE_METHODS", "STU", "ConvDecodeState", "STUTensordot", "alternating", "fft_size"]
