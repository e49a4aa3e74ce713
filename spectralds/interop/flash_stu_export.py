"""spectralds `LanguageModel` -> a flash-stu-2 directory: config.json, model.safetensors and the filter file.

flash-stu-2 (hazan-lab/flash-stu-2) expresses: a GELU-tanh gated MLP of an integer width multiple, one
`bias` flag for every linear, a tied head, STU layers at even indices and ALiBi attention (slopes x 0.25,
window (w, 0) = w + 1 keys, the softcap before the ALiBi bias as flash-attn has it) or STU at odd ones,
exact STUs or STU-T with one filter projection shared by both branches (Hankel-L: the "+" branch only),
and RMSNorm with the machine epsilon of its torch_dtype. Anything else is refused in one line naming the
feature.

The filter file (`spectral_filters.pt`, the model's own bank in its own column order, named by the
config's `filter_path`: flash-stu-2 reads it relative to its working directory) makes flash-stu-2 use
exactly our filters; the bank is also saved as the `phi` tensor, as flash-stu-2 saves it. Both
`tok_emb.weight` and `lm_head.weight` are written (transformers 4.x drops a tied head on its round trip).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from spectralds.errors import UserError

FILTER_FILE = "spectral_filters.pt"
_EPS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # nn.RMSNorm(eps=None): finfo(dtype).eps


def _refuse(feature: str) -> None:
    raise UserError(f"flash-stu-2 cannot express {feature}")


def _export_dtype(model: torch.nn.Module, norm_eps: float | None) -> torch.dtype:
    if norm_eps is None:
        return torch.float32
    for dtype in _EPS_DTYPES:
        if norm_eps == torch.finfo(dtype).eps:
            return dtype
    known = ", ".join(f"{str(d).removeprefix('torch.')} {torch.finfo(d).eps:.3g}" for d in _EPS_DTYPES)
    _refuse(f"norm_eps {norm_eps:g} (its RMSNorm uses the machine epsilon of torch_dtype: {known})")


def _check_mixers(model: torch.nn.Module) -> tuple[list[Any], list[Any]]:
    from spectralds.layers.attention import SlidingWindowAttention
    from spectralds.layers.stu import STU, STUTensordot

    mixers = [block.mixer for block in model.blocks]
    stus = [m for m in mixers if isinstance(m, (STU, STUTensordot))]
    attns = [m for m in mixers if isinstance(m, SlidingWindowAttention)]
    for i, m in enumerate(mixers):
        if not isinstance(m, (STU, STUTensordot, SlidingWindowAttention)):
            _refuse(f"{type(m).__name__} layers (block {i}): only STU, STU-T and attention")
        if isinstance(m, SlidingWindowAttention) != (i % 2 == 1 and bool(attns)):
            _refuse("this layer pattern: STU layers at even indices, attention at all odd ones or none")
    if len({type(m) for m in stus}) > 1:
        _refuse("exact STU and STU-T layers in one model (one use_approx flag)")
    if not stus:
        _refuse("a model without STU layers")
    return stus, attns


def _check_stu(stus: list[Any]) -> torch.Tensor:
    from spectralds.layers.stu import STUTensordot

    first = stus[0]
    for m in stus:
        if m.ar is not None:
            _refuse("STU autoregressive terms (ar_order > 0)")
        if m.variant not in ("hankel", "hankel_L"):
            _refuse(f"the {m.variant!r} filter variant")
        if m.dim_out != m.dim:
            _refuse("an STU with dim_out != dim")
        if not torch.equal(m.phi, first.phi):
            _refuse("STU layers with different filter banks (it has one)")
        if isinstance(m, STUTensordot):
            minus, plus = m.M_filters_minus, m.M_filters_plus
            if m.variant == "hankel_L" and bool(minus.any()):
                _refuse("STU-T with Hankel-L filters and a minus branch (its Hankel-L STU has only '+')")
            if m.variant == "hankel" and not torch.equal(minus, plus):
                _refuse("STU-T with M_filters_minus != M_filters_plus (it shares one M_filters)")
        elif m.variant == "hankel_L" and bool(m.M_phi_minus.any()):
            _refuse("an exact Hankel-L STU with a minus branch (its Hankel-L STU has only '+')")
    return first.phi


def _check_attention(attns: list[Any], seq_len: int) -> dict[str, Any]:
    if not attns:
        return {"use_attn": False, "window_size": 0, "softcap": 0.0}
    first = attns[0]
    for m in attns:
        positions = getattr(m, "positions", "rope")
        if positions != "alibi":
            _refuse(f"attention with positions {positions!r} (it uses ALiBi)")
        if getattr(m, "alibi_slope_scale", None) != 0.25:
            _refuse(f"ALiBi slopes scaled by {getattr(m, 'alibi_slope_scale', None)} (it uses 0.25)")
        if (m.num_heads, m.window_size, m.softcap) != (first.num_heads, first.window_size, first.softcap):
            _refuse("attention layers with different heads, windows or softcaps (one config)")
    # window_size keys = flash-attn's (w, 0) + the current one; full attention: every key within seq_len
    window = (first.window_size or seq_len) - 1
    return {"use_attn": True, "n_heads": first.num_heads, "window_size": window,
            "softcap": float(first.softcap or 0.0)}


def _biases(model: torch.nn.Module, hp: dict[str, Any], attns: list[Any]) -> bool:
    flags = {bool(hp.get("mlp_bias", False)), bool(hp.get("head_bias", False))}
    flags |= {m.qkv.bias is not None for m in attns} | {m.o_proj.bias is not None for m in attns}
    if len(flags) > 1:
        _refuse("biases on some linear layers and not others (one bias flag)")
    return flags.pop()


def flash_stu2_config(model: torch.nn.Module) -> tuple[dict[str, Any], torch.dtype, torch.Tensor]:
    """(config.json fields, torch_dtype, filter bank) for `model`, or a UserError naming what it cannot be."""
    hp = dict(model.hparams)
    if hp.get("mlp_activation", "silu") != "gelu_tanh":
        _refuse(f"the {hp.get('mlp_activation', 'silu')!r} MLP gate (its MLP is GELU-tanh gated)")
    dim = hp["dim"]
    if any(b.mlp is None for b in model.blocks):
        _refuse("blocks without an MLP")
    hidden = model.blocks[0].mlp.w1.out_features if model.blocks else 0
    if hidden % dim:
        _refuse(f"an MLP width {hidden} that is not a whole multiple of dim {dim} (mlp_scale is an integer)")
    if model.head.weight is not model.embed.weight:
        _refuse("an untied head (it ties tok_emb to lm_head)")
    if any(type(b.norm1).__name__ != "RMSNorm" for b in model.blocks):
        _refuse("blocks without a pre-norm")
    stus, attns = _check_mixers(model)
    phi = _check_stu(stus)
    dtype = _export_dtype(model, hp.get("norm_eps"))
    config = {
        "model_type": "FlashSTU", "architectures": ["FlashSTU"], "bsz": 1, "n_embd": dim,
        "n_heads": 1, "n_layers": len(model.blocks), "seq_len": hp["seq_len"],
        "vocab_size": hp["vocab_size"], "mlp_scale": hidden // dim, "bias": _biases(model, hp, attns),
        "dropout": float(hp.get("dropout", 0.0)),
        "num_eigh": stus[0].num_filters, "use_hankel_L": stus[0].variant == "hankel_L",
        "use_flash_fft": False, "use_approx": type(stus[0]).__name__ == "STUTensordot",
        "use_cache": False, "use_gradient_checkpointing": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "tie_word_embeddings": True, "stu_enable_mlp_sandwich": False, "stu_mlp_hidden_size": None,
        "filter_path": FILTER_FILE, "d_in_tile": None, "d_out_tile": None,
        **_check_attention(attns, hp["seq_len"]),
    }
    if stus[0].seq_len != hp["seq_len"] or any(a.dim != dim for a in attns):
        _refuse("layers whose seq_len or width differ from the model's")
    return config, dtype, phi


def _state_dict(model: torch.nn.Module, config: dict[str, Any], phi: torch.Tensor) -> dict[str, torch.Tensor]:
    from spectralds.layers.stu import STUTensordot

    out = {"phi": phi, "tok_emb.weight": model.embed.weight, "lm_head.weight": model.embed.weight.clone(),
           "norm.weight": model.norm.weight}
    bias = config["bias"]
    if bias:
        out["lm_head.bias"] = model.head.bias

    def linear(theirs: str, layer: torch.nn.Linear) -> None:
        out[f"{theirs}.weight"] = layer.weight
        if bias:
            out[f"{theirs}.bias"] = layer.bias

    for i, block in enumerate(model.blocks):
        p, m = f"layers.{i}", block.mixer
        is_attn = not hasattr(m, "phi")
        out[f"{p}.{'attn' if is_attn else 'stu'}_norm.weight"] = block.norm1.weight
        out[f"{p}.mlp_norm.weight"] = block.norm2.weight
        mlp = block.mlp
        for theirs, ours in (("gate_proj", mlp.w1), ("up_proj", mlp.w3), ("down_proj", mlp.w2)):
            linear(f"{p}.mlp.{theirs}", ours)
        if is_attn:
            linear(f"{p}.attn.c_attn", m.qkv)
            linear(f"{p}.attn.c_proj", m.o_proj)
        elif isinstance(m, STUTensordot):
            out[f"{p}.stu.M_inputs"], out[f"{p}.stu.M_filters"] = m.M_inputs, m.M_filters_plus
        else:
            out[f"{p}.stu.M_phi_plus"] = m.M_phi_plus
            if not config["use_hankel_L"]:
                out[f"{p}.stu.M_phi_minus"] = m.M_phi_minus
    return out


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in tensors.items():
        t = t.detach().cpu()
        cast = t.to(dtype)
        if not torch.equal(cast.to(t.dtype), t):
            name = str(dtype).removeprefix("torch.")
            _refuse(f"{key} in {name} without rounding (its norm_eps implies torch_dtype {name})")
        out[key] = cast.contiguous()
    return out


def export_flash_stu2(model: torch.nn.Module, out_dir: str | os.PathLike) -> None:
    """Write `model` as a flash-stu-2 directory (config.json, model.safetensors, spectral_filters.pt).

    `out_dir` must not exist or be empty: nothing is overwritten. Refuses, in one line naming the
    feature, what flash-stu-2 cannot express (see the module doc)."""
    from safetensors.torch import save

    from spectralds.io import atomic_write

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"refusing to write into {out}: it exists and is not an empty directory")
    if not hasattr(model, "blocks") or not hasattr(model, "embed") or not hasattr(model, "hparams"):
        raise UserError(f"export_flash_stu2 takes a spectralds LanguageModel, got a {type(model).__name__}")
    config, dtype, phi = flash_stu2_config(model)
    tensors = _cast(_state_dict(model, config, phi), dtype)
    bank = tensors["phi"]
    filters = {"phi": bank, "shape": list(bank.shape), "dtype": str(bank.dtype),
               "metadata": {"seq_len": bank.shape[0], "K": bank.shape[1],
                            "use_hankel_L": config["use_hankel_L"], "written_by": "spectralds"}}
    atomic_write(out / FILTER_FILE, lambda f: torch.save(filters, f))
    atomic_write(out / "model.safetensors", save(tensors, metadata={"format": "pt"}))
    atomic_write(out / "config.json", (json.dumps(config, indent=2) + "\n").encode())
