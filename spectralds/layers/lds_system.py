"""What every LDS layer shares: one real diagonal linear dynamical system (LDS) with h states.

The system is shared by every channel i the layer runs it on:

    x_t[i] = A * x_{t-1}[i] + B * u_t[i]     (the current input enters: lag 0 is included)
    U_t[i] = x_t[i] @ C                      (2K features: K "+" filters, then K "-" filters)

Fitted to the spectral filters (SpectraLDS), U reproduces the STU's convolutions; the layers of
`spectralds.layers.lds` carry an STU's learned projections around it ("exact": `LDSExact`, "tensordot":
`LDSTensordot`). This base holds the system (fitted: float64 buffers; learnable: parameters, A = tanh(A_raw)),
its checks, the sequence paths (the chunked scan `ops.lds_scan.scan`, or a convolution with the impulse
response, see `lds_paths`) and decoding. A subclass says how its projections wrap the system:

  projections: {name: axis roles} of its learned parameters; `_init_projections()` creates them.
  channels: how many channels the system runs on.
  _inputs(x): the system's input u for a layer input x; `_scan_readout(dtype)`: the C the scan reads
  out with; `_read_scan(U)`: the layer's output from the scan's; `_step_readout(C)` and
  `_read_state(state, C)` the same for one decoding step; `_conv_inputs(x)`, `_conv(...)`: the
  convolution path; `depthwise`: whether each channel has its own readout.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from spectralds.errors import UserError, UserTypeError, check_int
from spectralds.layers.lds_paths import ConvolutionPaths
from spectralds.layers.registry import SequenceLayer, add_repeated, check_continuation
from spectralds.ops.lds_conv import impulse_response_ref, powers
from spectralds.ops.lds_scan import final_state, scan, state_response, table_dtype
from spectralds.ops.spectrum_cache import SpectrumCache


class LDS(ConvolutionPaths, SequenceLayer):
    """Base of the diagonal LDS layers (`spectralds.layers.lds`); build one with `build_layer("lds", ...)`.

    Args:
        dim: input (and, by default, output) width.
        seq_len: longest sequence the fitted system is meant for (None: no limit).
        num_filters: K; the system has 2K outputs per channel.
        state_dim: h, the number of states of a freshly built system.
        dim_out: output width (default dim).
        learnable: train A, B, C directly (A = tanh(A_raw), so |a| < 1 always); otherwise the system
            is a float64 buffer set by `set_system` (zeros until then).
        dtype: run dtype of the scan and dtype of the parameters: float32 or float64 (or their names).
        chunk_size: c, the chunk length of the scan.
        conv_path: the training forward's path: "auto" (chosen per shape and device, `ops.costs.lds_path`),
            "scan", "conv" (the cheaper convolution), "kernel" / "project" (exact mode's convolutions).
    """

    mode: str = ""  # the registry's "mode" of the subclass ("exact" / "tensordot"), kept in `spec()`
    # The learned projections: name -> the role of each axis, "in" (input channels), "out" (output
    # channels) or "" (filters). `distill.convert` copies them from an STU and restricts them to channels.
    projections: dict[str, tuple[str, ...]] = {}

    def __init__(
        self,
        dim: int,
        seq_len: int | None = None,
        num_filters: int = 24,
        state_dim: int = 80,
        dim_out: int | None = None,
        learnable: bool = True,
        dtype: torch.dtype | str = torch.float32,
        chunk_size: int = 64,
        conv_path: str = "auto",
    ) -> None:
        super().__init__()
        self.conv_path = conv_path
        for name, value in (("dim", dim), ("num_filters", num_filters), ("state_dim", state_dim),
                            ("chunk_size", chunk_size)):
            check_int(name, value)
        for name, value in (("seq_len", seq_len), ("dim_out", dim_out)):
            if value is not None:
                check_int(name, value)
        if seq_len is not None and num_filters > seq_len:
            raise UserError(f"num_filters ({num_filters}) cannot exceed seq_len ({seq_len})")
        run_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        if run_dtype not in (torch.float32, torch.float64):
            raise UserError(f"dtype must be float32 or float64 (or their names), got {dtype!r}")
        self.dim, self.dim_out = dim, dim_out or dim
        self.seq_len, self.num_filters = seq_len, num_filters
        self.run_dtype = run_dtype
        self.chunk_size = chunk_size
        self._init_projections()
        self._step_cache = None  # decoding tables, see `_step_tables`
        self._spectra = SpectrumCache()  # a fixed system's response spectra (see `lds_paths`)
        if learnable:
            self._store(*_random_system(state_dim, num_filters), learnable=True)
        else:
            zeros = torch.zeros(state_dim, dtype=torch.float64)
            self._store(zeros, zeros, torch.zeros(state_dim, 2 * num_filters, dtype=torch.float64), False)

    def projection_axes(self) -> dict[str, tuple[str, ...]]:
        """The learned projections by (sub)module path, with the role of each axis (see `projections`)."""
        return dict(self.projections)

    def projection_names(self) -> tuple[str, ...]:
        """The learned projections' names, as `get_parameter` takes them."""
        return tuple(self.projection_axes())

    # ---- the system -------------------------------------------------------------------------------

    @property
    def learnable(self) -> bool:
        return "A_raw" in self._parameters

    @property
    def state_dim(self) -> int:
        return self.B.shape[0]

    def spec(self) -> dict:
        """`build_layer` arguments rebuilding this layer as it is now (after pruning or a fit); `conv_path`
        is listed when pinned, so the specs of "auto" layers, checkpoints from before it included, stay."""
        pinned = {"conv_path": self.conv_path} if self.conv_path != "auto" else {}
        return {
            "name": "lds",
            "dim": self.dim,
            "seq_len": self.seq_len,
            "num_filters": self.num_filters,
            "state_dim": self.state_dim,
            "mode": self.mode,
            "dim_out": self.dim_out,
            "learnable": self.learnable,
            "dtype": str(self.run_dtype).removeprefix("torch."),
            "chunk_size": self.chunk_size,
            **pinned,
        }

    def system(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The effective (A (h,), B (h,), C (h, 2K)), differentiable when learnable."""
        A = torch.tanh(self.A_raw) if self.learnable else self.A
        return A, self.B, self.C

    def set_system(self, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, learnable: bool = False) -> None:
        """Install a system on the layer's device. Fixed systems are kept exactly, as float64 buffers.

        A learnable system gets new parameters: build the optimizer afterwards.
        """
        self._store(A, B, C, learnable)

    def keep_states(self, index: torch.Tensor) -> None:
        """Shrink the system to the states in `index` (LAST pruning): A, B, C really get smaller."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.B.device).reshape(-1)
        if (
            index.numel() == 0
            or index.min() < 0
            or index.max() >= self.state_dim
            or index.unique().numel() < index.numel()
        ):
            raise UserError(
                f"keep_states needs distinct indices in [0, {self.state_dim}), got {index.tolist()}"
            )
        if self.learnable:  # keep the raw parameters bit-exact instead of going through atanh(tanh(.))
            raw, B, C = self.A_raw.detach()[index], self.B.detach()[index], self.C.detach()[index]
            self.A_raw, self.B, self.C = nn.Parameter(raw), nn.Parameter(B), nn.Parameter(C)
        else:
            self._store(self.A[index], self.B[index], self.C[index], learnable=False)

    def impulse_response(self, length: int) -> torch.Tensor:
        """(length, 2K) float64: the filters the system realizes, sum_j C[j, k] B[j] A[j]^t."""
        return impulse_response_ref(*(p.detach().double() for p in self.system()), length)  # direct pow

    def _store(self, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, learnable: bool) -> None:
        device = self.get_parameter(next(iter(self.projections))).device
        A, B, C = (torch.as_tensor(p).detach().to(device, copy=True) for p in (A, B, C))
        h = A.shape[0] if A.dim() == 1 else -1
        if A.dim() != 1 or B.shape != (h,) or C.shape != (h, 2 * self.num_filters):
            raise UserError(
                f"LDS system needs A (h,), B (h,), C (h, {2 * self.num_filters}); "
                f"got {tuple(A.shape)}, {tuple(B.shape)}, {tuple(C.shape)}"
            )
        if not all(torch.isfinite(p).all() for p in (A, B, C)):
            raise UserError("LDS system has non-finite entries")
        if A.abs().max() > 1:
            raise UserError(f"LDS system is unstable: max |a| = {A.abs().max().item():.6g} > 1")
        for name in ("A", "A_raw", "B", "C"):
            self._parameters.pop(name, None)
            self._buffers.pop(name, None)
        if learnable:  # tanh keeps |a| < 1 whatever the optimizer does; |a| = 1 is nudged inside
            bound = 1 - torch.finfo(self.run_dtype).eps
            A_raw = torch.atanh(A.double().clamp(-bound, bound))
            for name, p in (("A_raw", A_raw), ("B", B), ("C", C)):
                self.register_parameter(name, nn.Parameter(p.to(self.run_dtype)))
        else:
            for name, p in (("A", A), ("B", B), ("C", C)):
                self.register_buffer(name, p.to(torch.float64))

    def _apply(self, fn, recurse=True):  # fitted float64 buffers stay float64 under .to(dtype)
        fitted = {n: self._buffers[n] for n in ("A", "B", "C") if n in self._buffers}
        super()._apply(fn, recurse)
        for name, tensor in fitted.items():
            self._buffers[name] = tensor.to(self._buffers[name].device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint may hold a pruned (smaller) or a fitted system: resize our storage to match it.
        h = state_dict[prefix + "B"].shape[0] if prefix + "B" in state_dict else None
        if h is not None and prefix + "A" in state_dict:
            A = torch.zeros(h, dtype=torch.float64)
            self._store(A, A, torch.zeros(h, 2 * self.num_filters), learnable=False)
        elif h is not None and prefix + "A_raw" in state_dict:
            A = torch.zeros(h, dtype=torch.float64)
            self._store(A, A, torch.zeros(h, 2 * self.num_filters), learnable=True)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- sequences ----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        # `start` (left padding) needs nothing: time-invariant from a zero state, on zeroed padding.
        self._check_input(x)
        path = self._sequence_path(x.shape[0], x.shape[1])
        return self._scan_prefill(x)[0] if path == "scan" else self._convolve(x, path)

    def prefill(
        self, x: torch.Tensor, start: torch.Tensor | None = None, state: torch.Tensor | None = None,
        keep_state: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Outputs and the state after them by `forward`'s path: the scan, or the convolution plus the
        final state (`ops.lds_scan.final_state`, one matmul); state: continue it (`SequenceLayer.prefill`)."""
        self._check_input(x)
        check_continuation(start, state, x.shape[0], self._state_batch(state), not keep_state)
        path, T, keep = self._sequence_path(x.shape[0], x.shape[1]), x.shape[1], state is None or keep_state
        y, final = self._scan_prefill(x) if path == "scan" else (self._convolve(x, path), None)
        final = (self._final_state(x) if final is None else final) if keep else None
        if state is None:
            return y, final
        if keep_state:  # A^T state on top of the chunk's own
            A_T = powers(self.system()[0].to(table_dtype(x.device)), T, 1)[0]
            final = final + state.to(self.run_dtype) * A_T.to(self.run_dtype)
        return add_repeated(y, self._carried_outputs(state, T).to(x.dtype)), final

    def continues_repeated(self) -> bool:  # the state's response is added to each of its rows' chunks
        return True

    def _carried_outputs(self, state: torch.Tensor, T: int) -> torch.Tensor:
        """What `state` (B, channels, h) adds to the next T outputs (B, T, dim_out)."""
        C = self._scan_readout(table_dtype(state.device))
        return self._read_scan(state_response(state, self.system()[0], C, T, self.run_dtype)[0])

    def _state_batch(self, state: torch.Tensor | None) -> int | None:
        if state is None:
            return None
        shape = (self.channels, self.state_dim)
        if not (isinstance(state, torch.Tensor) and state.dim() == 3 and state.shape[1:] == shape):
            got = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
            raise UserError(f"an LDS state is a (batch, {shape[0]}, {shape[1]}) tensor, got {got}")
        return state.shape[0]

    def _scan_prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        U, state = self.scan(self._inputs(x), self._scan_readout(table_dtype(x.device)))
        return self._read_scan(U).to(x.dtype), state

    def _final_state(self, x: torch.Tensor) -> torch.Tensor:
        """The state (B, channels, h) in the run dtype after x (B, T, dim) from a zero state."""
        A, B, _ = self.system()
        return final_state(self._inputs(x), A, B, self.run_dtype)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise UserError(f"LDS expects input (batch, seq, {self.dim}), got {tuple(x.shape)}")
        if x.shape[1] == 0:
            raise UserError("LDS got an empty sequence")
        if self.seq_len is not None and x.shape[1] > self.seq_len:
            raise UserError(f"sequence length {x.shape[1]} exceeds the LDS seq_len {self.seq_len}")

    def features(self, u: torch.Tensor) -> torch.Tensor:
        """U (batch, seq, channels, 2K): the system's outputs for every channel of u."""
        return self.scan(u, self.C)[0]

    def scan(self, u: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`ops.lds_scan.scan` of u (B, T, ch) through the layer's A, B and the readout C, in the run dtype:
        outputs (B, T, ch, F) and the final state (B, ch, h)."""
        A, B, _ = self.system()
        return scan(u, A, B, C, self.chunk_size, self.run_dtype)

    # ---- decoding -----------------------------------------------------------------------------------

    def init_state(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Zero state (batch, channels, h) in the run dtype (`dtype` is ignored: states need precision)."""
        return torch.zeros(batch_size, self.channels, self.state_dim, device=device, dtype=self.run_dtype)

    def step(self, x_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token; the cost does not depend on the position (no cache grows)."""
        A, B, C = self._step_tables()
        state = A * state + B * self._inputs(x_t).to(self.run_dtype)[..., None]
        return self._read_state(state, C).to(x_t.dtype), state

    def merge_states(self, states: list[torch.Tensor]) -> torch.Tensor:  # zeros before a prompt add nothing
        return torch.cat(states)

    def static_state(self, state: torch.Tensor) -> torch.Tensor:  # (batch, channels, h) at any position
        return state

    def _step_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A, B and the step's readout (`_step_readout`) in the run dtype, cached across decoding steps while
        autograd is off: keyed by the source tensors and their versions (an optimizer step invalidates it)."""
        sources = [(t, t._version) for t in (*self.parameters(), *self.buffers())]
        cached = self._step_cache
        if not torch.is_grad_enabled() and cached is not None and len(cached[0]) == len(sources):
            if all(a is b and va == vb for (a, va), (b, vb) in zip(cached[0], sources, strict=True)):
                return cached[1]
        A, B, C = (p.to(self.run_dtype) for p in self.system())
        tables = A, B, self._step_readout(C)
        self._step_cache = (sources, tables) if not torch.is_grad_enabled() else None
        return tables

    # ---- what a subclass defines ---------------------------------------------------------------------

    @property
    def channels(self) -> int:
        raise NotImplementedError

    def _init_projections(self) -> None:  # the base has none: say how to build a layer
        raise UserTypeError(
            f"{type(self).__name__} is the base of the LDS layers: build one with "
            "build_layer('lds', mode='exact' | 'tensordot', ...) (spectralds.layers.lds.make_lds)"
        )

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _scan_readout(self, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def _read_scan(self, U: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _step_readout(self, C: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _read_state(self, state: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _random_system(h: int, K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A stable random system for direct training: time scales log-spread up to ~10^4 steps, both signs."""
    magnitude = 1 - torch.logspace(math.log10(0.5), -4, h, dtype=torch.float64)
    A = magnitude * torch.where(torch.arange(h) % 2 == 0, 1.0, -1.0).double()
    B = (1 - A**2).sqrt()  # unit state variance for white unit input
    C = torch.randn(h, 2 * K, dtype=torch.float64) / math.sqrt(h)
    return A, B, C
