"""The diagonal LDS as a recurrence: a chunked scan, next to its plain step-by-step reference.

With A (h,), B (h,) and a readout C, every input channel i runs its own copy of the h states:

    x_t[i] = A * x_{t-1}[i] + B * u_t[i]      (the current input enters: lag 0 is included)
    y_t[i] = x_t[i] @ C                       (C (h, F) shared by all channels, or C[i] (h, F) per channel)

fast op                                          reference (a loop over time)
  scan(u, A, B, C, chunk, dtype)                   scan_ref(u, A, B, C)
  final_state(u, A, B, dtype)                      scan_ref's second result
  state_response(x0, A, C, T, dtype)               (x = A x from x0, zero inputs, in a loop)
  mapped_state_response(x0, A, maps, T)            (the same, read out and projected)
(the impulse response, G[t] = sum_j C[j] B[j] A[j]^t, is `ops.lds_conv.impulse_response` and its
reference `impulse_response_ref`.)

`scan` never loops over time: inside a chunk of c steps the output is a causal matmul with the impulse
response; the states at chunk ends are combined by a log-depth scan over chunks; each chunk adds the
response to the state it inherits. Its tables are built in float64 (`table_dtype`) from the system and
cast to the run dtype, so no large power is ever formed in float32. Checked against `scan_ref` in
float64 in tests/ops/test_ops.py. Note: TF32 matmuls (torch.set_float32_matmul_precision("high")) cut the
float32 accuracy to ~1e-3.
"""

from __future__ import annotations

import torch
from torch import nn

from spectralds.ops.lds_conv import powers


def table_dtype(device: torch.device) -> torch.dtype:
    """The dtype the scan's tables are built in: float64, float32 on MPS (which has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


def scan(
    u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked scan of u (batch, T, ch) through (A, B, C) from a zero state, run in `dtype`.

    C is (h, F), shared by all channels, or (ch, h, F), one readout per channel.
    Returns the outputs (batch, T, ch, F) and the final state (batch, ch, h), both in `dtype`.
    """
    batch, T, ch = u.shape
    c, dt = chunk, dtype
    tdt = table_dtype(u.device)
    A, B, C = A.to(tdt), B.to(tdt), C.to(tdt)
    C = C if C.dim() == 3 else C[None]  # (groups, h, F): 1 group or one per channel
    h, F = C.shape[-2:]

    with torch.autocast(u.device.type, enabled=False):
        # Tables (float64): A^t for t in 0..c-1, the chunk's impulse response as a Toeplitz matrix,
        # the response to the inherited state, and the weights giving a chunk's final state.
        pw = A ** torch.arange(c, dtype=tdt, device=A.device)[:, None]  # (c, h)
        kernel = torch.einsum("tj,gjf->gtf", pw * B, C)  # (G, c, F)
        lag = torch.arange(c, device=A.device)[None, :] - torch.arange(c, device=A.device)[:, None]
        toeplitz = kernel[:, lag.clamp(min=0)] * (lag >= 0)[None, :, :, None]  # (G, s, tau, F)
        from_state = torch.einsum("tj,gjf->gjtf", pw * A, C)  # (G, h, tau, F): C A^(tau+1)
        table = torch.cat([toeplitz, from_state], dim=1).flatten(2).to(dt)  # (G, c + h, c F)
        to_end = (pw.flip(0) * B).to(dt)  # (c, h): A^(c-1-s) B

        # Left zero-padding keeps the zero initial state, so the last chunk ends at the last step.
        u = nn.functional.pad(u.to(dt), (0, 0, (-T) % c, 0))
        n = u.shape[1] // c
        chunks = u.view(batch, n, c, ch).transpose(2, 3)  # (B, N, ch, c)
        ends = _combine_chunks(chunks @ to_end, A**c)  # (B, N, ch, h): state at each chunk end
        inherited = nn.functional.pad(ends[:, :-1], (0, 0, 0, 0, 1, 0))
        z = torch.cat([chunks, inherited], dim=-1)  # (B, N, ch, c + h)
        if C.shape[0] == 1:
            out = (z.reshape(-1, c + h) @ table[0]).view(batch, n, ch, c, F)
        else:
            out = (z.permute(2, 0, 1, 3).reshape(ch, -1, c + h) @ table).view(ch, batch, n, c, F)
            out = out.permute(1, 2, 0, 3, 4)
        # Stored as (B, T, F, ch) so an exact readout can contract (k, i) without copying its weights.
        out = out.permute(0, 1, 3, 4, 2).reshape(batch, n * c, F, ch)[:, n * c - T :]
    return out.transpose(2, 3), ends[:, -1].clone()  # a view would keep every chunk-end state alive


def _combine_chunks(local: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """ends[n] = sum_{m <= n} decay^(n - m) local[m] over dim 1, in log2(N) doubling steps."""
    ends, shift = local, 1
    while shift < ends.shape[1]:
        carried = (decay**shift).to(ends.dtype) * ends[:, :-shift]
        ends = torch.cat([ends[:, :shift], ends[:, shift:] + carried], dim=1)
        shift *= 2
    return ends


def final_state(u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The state (batch, ch, h) in `dtype` after u (batch, T, ch) from a zero state: the sum of
    A^(T-1-t) B u_t over t, one matmul with the powers built in `table_dtype` (no large power is formed
    in float32)."""
    tdt = table_dtype(u.device)
    weights = (powers(A.to(tdt), 0, u.shape[1]).flip(0) * B.to(tdt)).to(dtype)  # (T, h)
    with torch.autocast(u.device.type, enabled=False):  # a bf16 state would lose the fit (cancellation)
        return torch.einsum("btc,th->bch", u.to(dtype), weights)


def state_response(
    state: torch.Tensor, A: torch.Tensor, C: torch.Tensor, T: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a state x0 (batch, ch, h), left by earlier inputs, adds to the next T steps: to their outputs,
    (batch, T, ch, F) readouts of A^(t+1) x0 through C ((h, F) or (ch, h, F)), and A^T x0 to the state
    after them, both in `dtype` (powers built in `table_dtype`). The scan from a zero state plus this is
    the scan from x0: the recurrence is linear."""
    batch, ch, h = state.shape
    tdt = table_dtype(state.device)
    pw = powers(A.to(tdt), 1, T)  # (T, h): A^1 .. A^T
    C, x0 = C.to(tdt).to(dtype), state.to(dtype)
    with torch.autocast(state.device.type, enabled=False):
        if C.dim() == 2:  # one readout: (batch ch, h) @ (h, T F)
            table = (pw.T.to(dtype)[:, :, None] * C[:, None, :]).flatten(1)
            out = (x0.reshape(-1, h) @ table).view(batch, ch, T, -1).transpose(1, 2)
        else:
            out = torch.einsum("bch,th,chf->btcf", x0, pw.to(dtype), C)
    return out, x0 * pw[-1].to(dtype)


def mapped_state_response(state: torch.Tensor, A: torch.Tensor, maps: torch.Tensor, T: int) -> torch.Tensor:
    """What a state x0 (batch, ch, h) adds to the next T outputs of a layer whose readout and output
    projection fold into one map per state, maps (h, out, ch): sum_j A_j^(t+1) maps[j] x0[:, :, j], as
    (batch, T, out) in `table_dtype`. It costs batch h ch out + batch T h out multiply-adds instead of
    `state_response`'s readouts of every channel at every step and their projection."""
    tdt = table_dtype(state.device)
    with torch.autocast(state.device.type, enabled=False):
        mapped = torch.einsum("bcj,joc->bjo", state.to(tdt), maps.to(tdt))  # (batch, h, out)
        return torch.einsum("th,bho->bto", powers(A.to(tdt), 1, T), mapped)


def scan_ref(
    u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence one step after another: outputs (batch, T, ch, F) and the final state (batch, ch, h)
    for u (batch, T, ch), C (h, F) or (ch, h, F). It runs in the dtype u, A, B and C promote to (pass
    float64 tensors for a float64 reference, float32 ones for a float32 run), each state as A * x + B * u;
    the readout is one matmul over all the states at the end."""
    dtype = torch.promote_types(torch.promote_types(u.dtype, A.dtype), torch.promote_types(B.dtype, C.dtype))
    u, A, B, C = (t.to(dtype) for t in (u, A, B, C))
    batch, T, ch = u.shape
    x = torch.zeros(batch, ch, A.shape[0], dtype=dtype, device=u.device)
    states = torch.empty(batch, T, ch, A.shape[0], dtype=dtype, device=u.device)
    for t in range(T):
        x = A * x + B * u[:, t, :, None]
        states[:, t] = x
    return (states @ C if C.dim() == 2 else (states[..., None, :] @ C)[..., 0, :]), x
