"""The two reference formats' configs -> one `SourceArch`: what the source model computes.

"flash-stu-2" (hazan-lab/flash-stu-2, a `FlashSTUConfig` with n_embd, n_heads, n_layers, ...) and
"spectralds-paper" (dshah02/SpectraLDS, dim, num_heads, num_layers, ...). Every difference between what
their code computes and what a field's name suggests is decided here (see interop-facts.md):
* attention: flash-attn `window_size=(w, 0)` attends to w + 1 keys (the current one included);
  flash-stu-2 always uses ALiBi (slopes x 0.25) and passes its softcap; the paper code never passes
  its softcap, and its RoPE rotates along the heads axis: after `model.to(dtype)` the complex table is
  its real part, so q and k are only scaled, channel pair i of head h by cos(h * theta^(-2i/head_dim))
  ("cosine"), unless `use_alibi` (then ALiBi as flash-stu-2, without RoPE);
* RMSNorm is `torch.nn.RMSNorm(eps=None)`: the machine epsilon of the dtype it ran in (torch_dtype);
* layer i is STU for even i; odd i is attention when use_attn (paper: even i too when all_attn).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from spectralds.errors import UserError

FORMATS = ("flash-stu-2", "spectralds-paper")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}
_MISSING = object()


@dataclass
class SourceArch:
    """What the source computes, in its own terms (window_size here is already ours: keys attended)."""

    format: str
    dim: int
    num_heads: int
    num_layers: int
    seq_len: int
    vocab_size: int
    num_filters: int
    mlp_hidden: int
    kinds: list[str]  # per layer: "stu" or "attn"
    approx: bool  # STU-T (M_inputs, M_filters) rather than exact (M_phi_plus, M_phi_minus)
    hankel_L: bool
    minus_branch: bool  # False: the STU computes the "+" branch only (flash-stu-2 with use_hankel_L)
    bias: bool
    window_size: int | None
    softcap: float | None
    positions: str  # "alibi", "none" or "cosine"
    theta: float
    tied: bool
    dtype: torch.dtype
    norm_eps: float
    dropout: float
    tile: int | None = None  # flash-stu-2 STU-T tiling: only the diagonal blocks of M_inputs are used
    filter_path: str | None = None
    notes: list[str] = field(default_factory=list)


def detect_format(config: dict[str, Any], requested: str = "auto") -> str:
    if requested != "auto":
        if requested not in FORMATS:
            raise UserError(f"unknown format {requested!r}; expected auto, {', '.join(FORMATS)}")
        return requested
    if "n_embd" in config:
        return "flash-stu-2"
    if "dim" in config and "num_layers" in config:
        return "spectralds-paper"
    raise UserError("cannot tell the source format from its config (no n_embd as flash-stu-2 has, no dim and "
                    "num_layers as the SpectraLDS paper code has); pass --format")


class _Fields:
    """Typed access to config fields; a missing or malformed one is a UserError naming the field."""

    def __init__(self, config: dict[str, Any], fmt: str) -> None:
        self.config, self.fmt = config, fmt

    def get(self, name: str, kind: type | tuple, default: Any = _MISSING) -> Any:
        if name not in self.config or self.config[name] is None and default is not _MISSING:
            if default is _MISSING:
                raise UserError(f"the {self.fmt} config has no field {name!r}")
            return default
        value = self.config[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok:
            names = " or ".join(k.__name__ for k in kinds)
            raise UserError(f"config field {name!r} must be {names}, got {value!r}")
        return value

    def positive(self, name: str, default: Any = _MISSING) -> int:
        value = self.get(name, int, default)
        if value < 1:
            raise UserError(f"config field {name!r} must be a positive integer, got {value}")
        return value

    def dtype(self, default: str | None) -> torch.dtype:
        # transformers 5 writes `dtype` where 4.x wrote `torch_dtype`
        key = "torch_dtype" if "torch_dtype" in self.config or "dtype" not in self.config else "dtype"
        name = self.get(key, str, default)
        name = "float32" if name is None else name.removeprefix("torch.")
        if name not in _DTYPES:
            raise UserError(f"config field {key!r} {name!r} is not one of {', '.join(_DTYPES)}")
        return _DTYPES[name]


def _mlp_hidden(f: _Fields, dim: int) -> int:
    scale = f.get("mlp_scale", (int, float))
    hidden = dim * scale
    if scale <= 0 or hidden != int(hidden):
        raise UserError(f"config field 'mlp_scale' {scale!r} times the width {dim} is not a positive integer")
    return int(hidden)


def _window(f: _Fields, name: str = "window_size") -> int | None:
    """flash-attn's (left, right) window: left keys before the current one; -1 is unlimited."""
    value = f.get(name, (int, list))
    if isinstance(value, list):
        if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise UserError(f"config field {name!r} must be an integer or [left, right], got {value!r}")
        value = value[0]  # causal attention: the right half of the window never reaches a later key
    if value < 0:
        return None
    return value + 1  # (w, 0) attends to w keys before the current one, and the current one


def _eps(f: _Fields, dtype: torch.dtype, norm_eps: float | None, arch_notes: list[str]) -> float:
    if norm_eps is not None:
        arch_notes.append(f"norm_eps {norm_eps:g} as given (the source's nn.RMSNorm(eps=None) would use "
                          f"{torch.finfo(dtype).eps:.3g}, the machine epsilon of {_name(dtype)})")
        return norm_eps
    return torch.finfo(dtype).eps


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_flash_stu2(config: dict[str, Any], norm_eps: float | None = None) -> SourceArch:
    f, notes = _Fields(config, "flash-stu-2"), []
    if f.get("stu_enable_mlp_sandwich", bool, False):
        raise UserError("config field 'stu_enable_mlp_sandwich' is true: an MLP around the STU has no "
                        "spectralds equivalent")
    dim, layers = f.positive("n_embd"), f.positive("n_layers")
    approx, use_attn = f.get("use_approx", bool), f.get("use_attn", bool)
    hankel_L = f.get("use_hankel_L", bool)
    kinds = ["attn" if use_attn and i % 2 else "stu" for i in range(layers)]
    tiles = [t for t in (f.get("d_in_tile", int, None), f.get("d_out_tile", int, None)) if t is not None]
    tile = min(tiles) if tiles and approx and min(tiles) < dim else None  # fs2 tiles only STU-T, when smaller
    if tile is not None and tile < 1:
        raise UserError(f"config fields 'd_in_tile' / 'd_out_tile' must be positive, got {tile}")
    softcap = float(f.get("softcap", (int, float), 0.0))
    dtype = f.dtype(None)
    return SourceArch(
        format="flash-stu-2", dim=dim, num_heads=f.positive("n_heads"), num_layers=layers,
        seq_len=f.positive("seq_len"), vocab_size=f.positive("vocab_size"),
        num_filters=f.positive("num_eigh"), mlp_hidden=_mlp_hidden(f, dim), kinds=kinds, approx=approx,
        hankel_L=hankel_L, minus_branch=not hankel_L, bias=f.get("bias", bool),
        window_size=_window(f) if use_attn else None,
        softcap=softcap if softcap > 0 else None, positions="alibi", theta=10000.0,
        tied=True,  # FlashSTU ties tok_emb to lm_head in __init__, whatever tie_word_embeddings says
        dtype=dtype, norm_eps=_eps(f, dtype, norm_eps, notes),
        dropout=float(f.get("dropout", (int, float), 0.0)), tile=tile,
        filter_path=f.get("filter_path", str, None), notes=notes,
    )


def parse_paper(config: dict[str, Any], norm_eps: float | None = None) -> SourceArch:
    f, notes = _Fields(config, "spectralds-paper"), []
    dim, layers = f.positive("dim"), f.positive("num_layers")
    use_attn, all_attn = f.get("use_attn", bool, True), f.get("all_attn", bool, False)
    kinds = ["attn" if (all_attn if i % 2 == 0 else use_attn) else "stu" for i in range(layers)]
    approx, hankel_L = f.get("use_approx", bool, True), f.get("use_hankel_L", bool, False)
    if approx and hankel_L and "stu" in kinds:
        raise UserError("config fields 'use_approx' and 'use_hankel_L' are both true: the paper code's STU-T "
                        "has no minus projection then and its forward fails, so no such model exists")
    alibi = f.get("use_alibi", bool, False)
    softcap = f.get("softcap", (int, float), None)
    if softcap and "attn" in kinds:
        notes.append(f"softcap {softcap:g} in the config is not applied (the paper code never passes it)")
    dtype = f.dtype("bfloat16")
    num_heads = f.positive("num_heads")
    if "attn" in kinds and not alibi and dim // num_heads % 2:
        raise UserError(f"config: head size {dim // num_heads} is odd; the paper code's RoPE needs it even")
    return SourceArch(
        format="spectralds-paper", dim=dim, num_heads=num_heads, num_layers=layers,
        seq_len=f.positive("seq_len"), vocab_size=f.positive("vocab_size"),
        num_filters=f.positive("num_eigh"), mlp_hidden=_mlp_hidden(f, dim), kinds=kinds, approx=approx,
        hankel_L=hankel_L, minus_branch=True,
        bias=f.get("bias", bool, False), window_size=_window(f) if "attn" in kinds else None,
        softcap=None, positions="alibi" if alibi else "cosine",
        theta=float(f.get("theta", (int, float), 10000.0)),
        tied=f.get("weight_tying", bool, True), dtype=dtype, norm_eps=_eps(f, dtype, norm_eps, notes),
        dropout=float(f.get("dropout", (int, float), 0.0)), notes=notes,
    )


def parse_config(config: dict[str, Any], fmt: str, norm_eps: float | None = None) -> SourceArch:
    arch = (parse_flash_stu2 if fmt == "flash-stu-2" else parse_paper)(config, norm_eps)
    if arch.dim % arch.num_heads and "attn" in arch.kinds:
        raise UserError(f"config: width {arch.dim} does not split into {arch.num_heads} heads")
    if arch.num_filters > arch.seq_len:
        raise UserError(f"config: num_eigh {arch.num_filters} exceeds seq_len {arch.seq_len}")
    return arch


def cosine_scale(num_heads: int, head_dim: int, theta: float) -> torch.Tensor:
    """(num_heads, head_dim) float64: the paper code's real-part RoPE table, cos(h * theta^(-2i/head_dim))
    on channels 2i and 2i + 1 of head h (its pairs are adjacent channels)."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(num_heads, dtype=torch.float64)[:, None] * freqs
    return torch.cos(angles).repeat_interleave(2, dim=1)


def describe(arch: SourceArch) -> str:
    """One line: what the source is."""
    kinds = "/".join(dict.fromkeys("stu_t" if k == "stu" and arch.approx else k for k in arch.kinds))
    parts = [f"{arch.format}: {arch.num_layers} layers ({kinds}), dim {arch.dim}, MLP {arch.mlp_hidden} "
             f"GELU-tanh gated, seq_len {arch.seq_len}, K {arch.num_filters}"
             + (" Hankel-L" if arch.hankel_L else ""), f"vocab {arch.vocab_size}", _name(arch.dtype),
             f"RMSNorm eps {arch.norm_eps:.3g}"]
    if "attn" in arch.kinds:
        window = "full" if arch.window_size is None else f"{arch.window_size} keys"
        cap = "none" if arch.softcap is None else f"{arch.softcap:g}"
        parts.append(f"attention {arch.num_heads} heads, window {window}, positions {arch.positions}, "
                     f"softcap {cap}")
    return ", ".join(parts)
