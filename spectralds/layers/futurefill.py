"""Exact incremental decoding of STU / STU-T layers: the naive cache and FutureFill.

Inference only (no autograd). The method is the layer's `decode_method` (see `SequenceLayer`):

* ``"naive"``: the state keeps every input; each output is a direct sum over the history, O(t) per token.
* ``"futurefill"`` (Agarwal et al., "FutureFill: fast generation from convolutional sequence models",
  arXiv 2410.03766), continuous variant: `prefill` computes the prompt's contribution to every later
  position with one FFT. Generated tokens follow a dyadic schedule: after the r-th generated token,
  with 2^j the largest power of two dividing r, the last 2^j tokens are convolved with the filters at
  lags 1..2^(j+1)-1 and added to the next 2^j positions of a "future" buffer. Each (source, target)
  pair is added exactly once (at the highest bit where their indices differ) before the target is
  produced, so an output is its buffer entry plus the lag-0 term: O(log^2 L) amortized per token. The
  state caches the generated tokens (after the input projection), never the prompt.

The functions take a `spectralds.layers.stu.SpectralConv` (this module does not import it: stu.py
imports this one) and use its kernel bank, encoding and contractions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from spectralds.errors import UserError
from spectralds.layers.registry import DECODE_METHODS, add_repeated, check_continuation
from spectralds.ops.fft_conv import compute_dtype, fft_size, no_autocast, real_fft

_DIRECT_BLOCK = 16  # FutureFill blocks up to this many tokens are summed directly (faster than an FFT)
_INITIAL_CACHE = 16  # first capacity of FutureFill's cache of generated tokens; it doubles as needed
# A continued prefill convolves at most max(chunk, _PIECE) sources with as many targets per FFT, so its
# memory follows the chunk, not seq_len (`prefill_from`).
_PIECE = 256


@dataclass
class ConvDecodeState:
    """Decoding state of an STU / STU-T layer (see the module docstring for the two methods).

    kernel, weight: the layer's kernel bank for lags 0..seq_len-1 and its per-token projection
    (futurefill and STU-T naive: the encoder weight; STU naive: the readout (2K * dim, dim_out)),
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


def _method(layer: Any) -> str:
    if layer.decode_method not in DECODE_METHODS:
        raise UserError(f"unknown decode method {layer.decode_method!r}; expected one of {DECODE_METHODS}")
    return layer.decode_method


@torch.no_grad()
def init_state(
    layer: Any, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> ConvDecodeState:
    method = _method(layer)
    device = layer.phi.device if device is None else torch.device(device)
    cdtype = compute_dtype(dtype or layer.phi.dtype)
    with no_autocast(device):
        kernel = layer._kernel(layer.seq_len, cdtype).to(device)
    weight = layer._encoder_weight().to(device)
    if method == "naive":
        if not layer.depthwise:  # STU keeps raw inputs (dim per token, not 2K * dim_out), reads out by M
            weight = weight.unflatten(1, (2 * layer.num_filters, layer.dim_out)).transpose(0, 1).flatten(0, 1)
        width = layer.dim_out if layer.depthwise else layer.dim
        # Reversed time (token t at row seq_len-1-t): the newest t+1 rows meet kernel lags 0..t unflipped.
        inputs = torch.zeros(batch_size, layer.seq_len, width, device=device, dtype=cdtype)
        return ConvDecodeState(method, 0, 0, kernel, weight, inputs)
    width = (layer.dim_out,) if layer.depthwise else (2 * layer.num_filters, layer.dim_out)
    capacity = min(layer.seq_len, _INITIAL_CACHE)
    inputs = torch.zeros(batch_size, *width, capacity, device=device, dtype=cdtype)
    future = torch.zeros(batch_size, layer.seq_len, layer.dim_out, device=device, dtype=cdtype)
    return ConvDecodeState(method, 0, 0, kernel, weight, inputs, future)


def _naive_encode(layer: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What the naive decoder stores per token, (B, T, width): STU-T x @ M_inputs, STU x itself."""
    return x @ weight.to(x.dtype) if layer.depthwise else x


def _naive_output(layer: Any, history: torch.Tensor, kernel: torch.Tensor, weight: torch.Tensor):
    """Output from `history` (B, t+1, width), row j = token t - j (pairs with kernel lag j): (B, dim_out)."""
    if layer.depthwise:
        return (history * kernel[: history.shape[1]]).sum(1)
    u = kernel[: history.shape[1]].T @ history  # (B, 2K, dim)
    return u.flatten(1) @ weight.to(u.dtype)


@torch.no_grad()
def prefill(
    layer: Any, x: torch.Tensor, state: ConvDecodeState | None = None, keep_state: bool = True
) -> tuple[torch.Tensor, ConvDecodeState | None]:
    """Outputs for x (B, T, dim) and the state after it; state: continue from it (`prefill_from`, or
    `outputs_from` for keep_state=False: the outputs only, state None)."""
    layer._check_input(x)
    if state is not None:
        return prefill_from(layer, x, state) if keep_state else (outputs_from(layer, x, state), None)
    batch, length, _ = x.shape
    state = init_state(layer, batch, x.device, x.dtype)
    if length == 0:
        return x.new_zeros(batch, 0, layer.dim_out), state
    if state.method == "naive":
        history = _naive_encode(layer, x, state.weight).flip(1)
        state.inputs[:, layer.seq_len - length :] = history.to(state.inputs.dtype)
        y = layer.forward(x)
    else:
        # The prompt's outputs as `forward` computes them, then its part of every later position.
        state.future[:, :length] = layer._sequence_conv(x, length)
        y = state.future[:, :length].to(x.dtype)
        if length < layer.seq_len:
            with no_autocast(x.device):
                _add_later(layer, layer._encode(x).to(state.future.dtype), state.future, 0, length)
        state.inputs = state.inputs[..., : min(_INITIAL_CACHE, layer.seq_len - length)]
    state.pos = state.start = length
    return y, state


@torch.no_grad()
def prefill_from(layer: Any, x: torch.Tensor, state: ConvDecodeState) -> tuple[torch.Tensor, ConvDecodeState]:
    """A chunk x (B, T, dim) after all `state` has seen (a prefill, steps, earlier chunks): the outputs
    and the state of one prefill over prefix + chunk; `state` is left unchanged. FutureFill: the chunk's
    part of its positions and every later one, by FFTs over pieces of targets; naive: the chunk's own
    convolution plus the stored history's part, by FFTs over pieces of the history. FutureFill first adds
    what the dyadic schedule still owes from generated tokens (`_flush`): the new state holds no generated
    token, and merges like a fresh prefill's."""
    _check_chunk(layer, x, state)
    batch, length, _ = x.shape
    pos, seq_len = state.pos, layer.seq_len
    if length == 0:
        return x.new_zeros(batch, 0, layer.dim_out), state
    end = pos + length
    if state.method == "naive":
        inputs = state.inputs.clone()
        encoded = _naive_encode(layer, x, state.weight).flip(1)
        inputs[:, seq_len - end : seq_len - pos] = encoded.to(inputs.dtype)
        with no_autocast(x.device):
            y = _with_history(layer, state, layer._sequence_conv(x, length))
        return y.to(x.dtype), ConvDecodeState("naive", end, end, state.kernel, state.weight, inputs)
    future, z = state.future.clone(), layer._encode(x)
    with no_autocast(x.device):
        _flush(layer, state, future)
        _add_later(layer, z.to(future.dtype), future, pos, pos)
    inputs = state.inputs.new_zeros(*state.inputs.shape[:-1], min(_INITIAL_CACHE, seq_len - end))
    new = ConvDecodeState("futurefill", end, end, state.kernel, state.weight, inputs, future, {**state.cache})
    return future[:, pos:end].to(x.dtype), new


@torch.no_grad()
def outputs_from(layer: Any, x: torch.Tensor, state: ConvDecodeState) -> torch.Tensor:
    """The outputs `prefill_from` gives for a chunk x (n B, T, dim) after `state` (B rows, each continued
    by n rows of x), without the state after it: the chunk's own causal convolution plus what the state
    adds to its positions. FutureFill: its
    `future` buffer there (after the schedule's outstanding part, `_flush`, when tokens were generated);
    naive: the stored history's part, by FFTs over pieces of it (no copy of the history)."""
    _check_chunk(layer, x, state, repeats=True)
    length, pos = x.shape[1], state.pos
    if length == 0:
        return x.new_zeros(x.shape[0], 0, layer.dim_out)
    y = layer._sequence_conv(x, length)
    with no_autocast(x.device):
        if state.method == "futurefill":
            future = state.future
            if state.pos != state.start:  # generated tokens: the schedule still owes later positions
                future = future.clone()
                _flush(layer, state, future)
            part = future[:, pos : pos + length].to(y.dtype)
        else:
            part = _with_history(layer, state, y.new_zeros(state.inputs.shape[0], *y.shape[1:]))
        return add_repeated(y, part).to(x.dtype)


def _check_chunk(layer: Any, x: torch.Tensor, state: Any, repeats: bool = False) -> None:
    if not isinstance(state, ConvDecodeState):
        raise UserError(f"an STU layer continues from a ConvDecodeState, not {type(state).__name__}")
    check_continuation(None, state, x.shape[0], state.inputs.shape[0], repeats)
    if state.pos + x.shape[1] > layer.seq_len:
        raise UserError(f"cannot prefill {x.shape[1]} tokens after {state.pos}: past "
                        f"seq_len={layer.seq_len}, the filters' length")


def _with_history(layer: Any, state: ConvDecodeState, y: torch.Tensor) -> torch.Tensor:
    """y (B, T, dim_out), a chunk's own outputs after a naive `state`, plus the stored history's part: FFTs
    over pieces of the history (max(T, _PIECE) tokens each), back in time order and encoded."""
    pos, length, seq_len = state.pos, y.shape[1], layer.seq_len
    piece = max(length, _PIECE)
    for first in range(0, pos, piece):
        history = state.inputs[:, seq_len - min(pos, first + piece) : seq_len - first].flip(1)
        z = history.transpose(1, 2) if layer.depthwise else layer._encode(history)
        y = y + layer._fill_fft(z.to(y.dtype), pos - first, length)
    return y


def _add_later(layer: Any, z: torch.Tensor, future: torch.Tensor, origin: int, first: int) -> None:
    """future[:, first:] += the part of encoded inputs z (B, ..., m), at positions origin.. origin+m-1,
    of every position from `first` on, max(m, _PIECE) positions at a time (memory follows m): one FFT of
    z serves every piece, each with the kernel spectrum of its lags (as `SpectralConv._fill_fft`)."""
    m = z.shape[-1]
    if first >= layer.seq_len:
        return
    piece = max(m, _PIECE)
    n = fft_size(m + piece - 1)  # no circular wrap-around reaches a kept output (see _fill_fft)
    zf = real_fft(z, n)
    for begin in range(first, layer.seq_len, piece):
        count, start = min(piece, layer.seq_len - begin), begin - origin
        lo = max(0, start - m + 1)  # the smallest lag that occurs
        spectrum = layer._kernel_spectrum(lo, start + count, n, z.dtype)
        y = torch.fft.irfft(layer._contract(zf, spectrum), n=n)[..., start - lo : start - lo + count]
        future[:, begin : begin + count] += y.transpose(1, 2)


def _flush(layer: Any, state: ConvDecodeState, future: torch.Tensor) -> None:
    """Add to `future` the contributions of the n generated tokens that the dyadic schedule has not added
    yet. The block of count c (sources c - lowbit(c) .. c-1, targets c .. c + lowbit(c) - 1, indices
    among the generated tokens) has run for every c <= n; a later c reaches a source below n exactly
    when c has one bit k that n lacks and agrees with n above it: sources prefix .. n-1 (prefix: n
    with bits k and below cleared), targets c .. c + 2^k - 1, c = prefix + 2^k. One FFT per such bit."""
    n, k = state.pos - state.start, 0
    while n and state.start + (1 << k) < layer.seq_len:  # c >= 2^k: later bits' targets lie past seq_len
        prefix = n >> (k + 1) << (k + 1)
        c = prefix + (1 << k)
        first, count = state.start + c, min(1 << k, layer.seq_len - state.start - c)
        if not n >> k & 1 and prefix < n and count > 0:
            src = state.inputs[..., prefix:n]
            future[:, first : first + count] += layer._fill_fft(src, c - prefix, count)
        k += 1


@torch.no_grad()
def step(layer: Any, x_t: torch.Tensor, state: ConvDecodeState) -> tuple[torch.Tensor, ConvDecodeState]:
    batch = state.inputs.shape[0]
    if x_t.dim() != 2 or x_t.shape != (batch, layer.dim):
        raise UserError(f"expected x_t of shape ({batch}, {layer.dim}), got {tuple(x_t.shape)}")
    t = state.pos
    if t >= layer.seq_len:
        raise UserError(f"cannot decode past seq_len={layer.seq_len}: the filters have no longer lags")
    cdtype = state.kernel.dtype
    row = layer.seq_len - 1 - t
    if state.method == "naive":
        state.inputs[:, row] = _naive_encode(layer, x_t[:, None], state.weight)[:, 0].to(cdtype)
        with no_autocast(x_t.device):
            y = _naive_output(layer, state.inputs[:, row:], state.kernel, state.weight)
    else:
        z_t = layer._encode(x_t[:, None], state.weight).to(cdtype)
        with no_autocast(x_t.device):
            y = state.future[:, t] + layer._contract_taps(z_t, _cached_taps(state, 0, 1, 1))[:, 0]
            _futurefill_update(layer, state, z_t)
    state.pos = t + 1
    return y.to(x_t.dtype), state


@torch.no_grad()
def merge_states(states: list[ConvDecodeState]) -> ConvDecodeState:
    """One batched state for prompts of different lengths, each state fresh from its own prefill.

    Every prompt is right-aligned at the longest, P, as if preceded by zero inputs: a convolution is
    time-invariant and zeros add nothing, so each sequence's outputs are those it gets decoded alone.
    Naive: the reversed history moves up by the shift; FutureFill: the future buffer moves right by it
    (what falls off the end lies past seq_len - P + T, where no token of that prompt is decoded).
    """
    first, longest = states[0], max(s.pos for s in states)
    if any(s.pos != s.start or s.method != first.method for s in states):
        raise UserError("merge_states takes states fresh from a prefill, all of one decode method")
    rows = []
    for s in states:
        shift = longest - s.pos
        if s.method == "naive":
            length = s.inputs.shape[1]
            rows.append(torch.roll(s.inputs, -shift, dims=1))  # rows before the history are zeros
            rows[-1][:, length - shift :] = 0
        else:
            rows.append(torch.nn.functional.pad(s.future, (0, 0, shift, 0))[:, : s.future.shape[1]])
    merged = torch.cat(rows)
    if first.method == "naive":
        return ConvDecodeState("naive", longest, longest, first.kernel, first.weight, merged)
    capacity = min(_INITIAL_CACHE, merged.shape[1] - longest)
    inputs = first.inputs.new_zeros(merged.shape[0], *first.inputs.shape[1:-1], capacity)
    # Taps and spectra depend only on the kernel, which every state shares.
    return ConvDecodeState("futurefill", longest, longest, first.kernel, first.weight, inputs, merged,
                           dict(first.cache))


def _futurefill_update(layer: Any, state: ConvDecodeState, z_t: torch.Tensor) -> None:
    t, r = state.pos, state.pos - state.start  # r: index of this token among the generated ones
    capacity = state.inputs.shape[-1]
    if r >= capacity:
        size = min(2 * capacity, layer.seq_len - state.start)
        grown = state.inputs.new_zeros(*state.inputs.shape[:-1], size)
        grown[..., :capacity] = state.inputs
        state.inputs = grown
    state.inputs[..., r] = z_t[..., 0]
    count = r + 1
    block = count & -count  # the largest power of two dividing count
    targets = min(block, layer.seq_len - 1 - t)
    if targets <= 0:
        return
    src = state.inputs[..., count - block : count]  # tokens t-block+1..t, for positions t+1..t+targets
    if block <= _DIRECT_BLOCK:
        contribution = layer._contract_taps(src, _cached_taps(state, block, targets, block))
    else:
        key = ("spectrum", block, targets)
        if key not in state.cache:
            n = fft_size(block + targets - 1)
            state.cache[key] = torch.fft.rfft(state.kernel[1 : block + targets], n=n, dim=0)
        contribution = layer._fill_fft(src, block, targets, state.cache[key])
    state.future[:, t + 1 : t + 1 + targets] += contribution


def toeplitz_taps(kernel: torch.Tensor, start: int, length: int, m: int) -> torch.Tensor:
    """Taps (length, m, columns) for outputs at start..start+length-1 from inputs at 0..m-1."""
    steps = torch.arange(max(length, m), device=kernel.device)
    lags = start + steps[:length, None] - steps[:m]
    return kernel[lags.clamp_min(0)] * (lags >= 0)[..., None].to(kernel.dtype)


def _cached_taps(state: ConvDecodeState, start: int, length: int, m: int) -> torch.Tensor:
    key = ("taps", start, length, m)
    if key not in state.cache:
        state.cache[key] = toeplitz_taps(state.kernel, start, length, m)
    return state.cache[key]
