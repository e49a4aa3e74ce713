"""Reference-format Flash STU checkpoints and an independent float64 forward of what they compute.

Written from the equations of /work/shared/reference/{interop,flash-stu}-facts.md, not from spectralds:
nothing here imports the importer or our layers, so a test comparing the two judges the importer by
the references' math, not by our own model. Formats: "flash-stu-2" (n_embd, ...) and "spectralds-paper"
(dim, ...). The forward reads the config the way each reference's code does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

F64 = torch.float64
DTYPE_EPS = {"float32": 2.0**-23, "bfloat16": 2.0**-7, "float16": 2.0**-10, None: 2.0**-23}


def fs2_config(**over) -> dict:
    cfg = {"model_type": "FlashSTU", "bsz": 1, "n_embd": 32, "n_heads": 4, "n_layers": 2, "seq_len": 64,
           "window_size": 8, "vocab_size": 96, "mlp_scale": 2, "bias": False, "dropout": 0.0, "num_eigh": 6,
           "use_hankel_L": False, "use_flash_fft": True, "use_approx": True, "use_attn": True, "softcap": 1.5,
           "torch_dtype": "float32", "tie_word_embeddings": True, "stu_enable_mlp_sandwich": False,
           "stu_mlp_hidden_size": None, "filter_path": None, "d_in_tile": None, "d_out_tile": None}
    return {**cfg, **over}


def paper_config(**over) -> dict:
    cfg = {"model_type": "FlashSTU", "dim": 32, "num_heads": 4, "num_layers": 2, "seq_len": 64,
           "weight_tying": True, "window_size": 8, "vocab_size": 96, "mlp_scale": 2, "bias": False,
           "dropout": 0.0, "num_eigh": 6, "use_hankel_L": False, "use_approx": True, "use_attn": True,
           "softcap": 50.0, "theta": 10000.0, "use_alibi": False, "torch_dtype": "float32", "all_attn": False}
    return {**cfg, **over}


def _get(cfg: dict, fs2_name: str, paper_name: str):
    return cfg[fs2_name] if "n_embd" in cfg else cfg[paper_name]


def hankel_bank(seq_len: int, k: int, hankel_L: bool) -> torch.Tensor:
    """numpy eigh of Z (float64), the top k in ascending order, times sigma^(1/4): flash-stu-2's recipe."""
    i = np.arange(1, seq_len + 1, dtype=np.float64)
    s = i[:, None] + i[None, :]
    z = ((-1.0) ** (s - 2) + 1) * 8 / ((s + 3) * (s - 1) * (s + 1)) if hankel_L else 2 / (s**3 - s)
    sigma, phi = np.linalg.eigh(z)
    return torch.from_numpy(phi[:, -k:] * sigma[-k:] ** 0.25)


def layer_kinds(cfg: dict) -> list[str]:
    n = _get(cfg, "n_layers", "num_layers")
    if "n_embd" in cfg:
        return ["attn" if cfg["use_attn"] and i % 2 else "stu" for i in range(n)]
    even = "attn" if cfg.get("all_attn") else "stu"
    return [even if i % 2 == 0 else ("attn" if cfg.get("use_attn", True) else "stu") for i in range(n)]


def random_state_dict(cfg: dict, seed: int = 0, both_heads: bool = False) -> dict[str, torch.Tensor]:
    """Random float64 weights under the reference keys (the head tied: one of the two keys)."""
    g = torch.Generator().manual_seed(seed)
    d, v = _get(cfg, "n_embd", "dim"), cfg["vocab_size"]
    h, k, bias = d * cfg["mlp_scale"], cfg["num_eigh"], cfg["bias"]

    def rnd(*shape, std=None):
        return torch.randn(*shape, generator=g, dtype=F64) * (std if std is not None else shape[-1] ** -0.5)

    sd = {"tok_emb.weight": rnd(v, d, std=1.0), "norm.weight": 1 + 0.1 * rnd(d, std=1.0)}
    if both_heads or not _tied(cfg):
        sd["lm_head.weight"] = sd["tok_emb.weight"].clone() if _tied(cfg) else rnd(v, d)
    if bias:
        sd["lm_head.bias"] = rnd(v, std=0.1)

    def linear(name, out_dim, in_dim):
        sd[f"{name}.weight"] = rnd(out_dim, in_dim)
        if bias:
            sd[f"{name}.bias"] = rnd(out_dim, std=0.1)

    for i, kind in enumerate(layer_kinds(cfg)):
        p = f"layers.{i}"
        sd[f"{p}.{kind}_norm.weight"] = 1 + 0.1 * rnd(d, std=1.0)
        sd[f"{p}.mlp_norm.weight"] = 1 + 0.1 * rnd(d, std=1.0)
        linear(f"{p}.mlp.gate_proj", h, d)
        linear(f"{p}.mlp.up_proj", h, d)
        linear(f"{p}.mlp.down_proj", d, h)
        if kind == "attn":
            linear(f"{p}.attn.c_attn", 3 * d, d)
            linear(f"{p}.attn.c_proj", d, d)
        elif cfg["use_approx"]:
            sd[f"{p}.stu.M_inputs"] = rnd(d, d)
            sd[f"{p}.stu.M_filters"] = rnd(k, d, std=0.5)
        else:
            sd[f"{p}.stu.M_phi_plus"] = rnd(k, d, d, std=0.5 * d**-0.5)
            if not ("n_embd" in cfg and cfg["use_hankel_L"]):
                sd[f"{p}.stu.M_phi_minus"] = rnd(k, d, d, std=0.5 * d**-0.5)
    return sd


def _tied(cfg: dict) -> bool:
    return True if "n_embd" in cfg else cfg.get("weight_tying", True)


def write_source(directory: Path, cfg: dict, sd: dict[str, torch.Tensor], name: str = "model.safetensors",
                 dtype: torch.dtype = F64) -> Path:
    """config.json plus the weights (a .safetensors or a torch file) in `directory`; returns the weights."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    tensors = {k: t.to(dtype).contiguous() for k, t in sd.items()}
    path = directory / name
    save_file(tensors, str(path)) if name.endswith(".safetensors") else torch.save(tensors, path)
    return path


def _causal_conv(kernel: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """y[b, t, c] = sum_{s <= t} kernel[t - s, c] u[b, s, c] (lag 0 included), by a direct sum."""
    T = u.shape[1]
    lag = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    toeplitz = torch.where((lag >= 0)[..., None], kernel[lag.clamp_min(0)], 0.0)  # (T, T, C)
    return torch.einsum("tsc,bsc->btc", toeplitz, u)


def _rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w


def alibi_slopes(n: int) -> torch.Tensor:
    """Press et al.'s slopes: 2^(-8 i / n), i = 1..n, for n a power of two; otherwise those of the power
    of two below plus every other slope of twice that power."""

    def power_of_two(m: int) -> list[float]:
        return [2 ** (-8 * (i + 1) / m) for i in range(m)]

    below = 2 ** int(math.floor(math.log2(n)))
    slopes = power_of_two(below) + power_of_two(2 * below)[0::2][: n - below]
    return torch.tensor(slopes, dtype=F64)


def _linear(sd, name, x):
    y = x @ sd[f"{name}.weight"].T
    return y + sd[f"{name}.bias"] if f"{name}.bias" in sd else y


def _attention(cfg, sd, p, x):
    d = _get(cfg, "n_embd", "dim")
    heads = _get(cfg, "n_heads", "num_heads")
    hd = d // heads
    B, T, _ = x.shape
    q, k, v = (t.view(B, T, heads, hd) for t in _linear(sd, f"{p}.c_attn", x).chunk(3, dim=-1))
    fs2 = "n_embd" in cfg
    alibi = fs2 or cfg.get("use_alibi", False)
    if not alibi:  # the paper code's RoPE over the heads axis, its complex table cast to its real part
        freqs = cfg["theta"] ** (-torch.arange(0, hd, 2, dtype=F64) / hd)
        cos = torch.cos(torch.arange(heads, dtype=F64)[:, None] * freqs).repeat_interleave(2, dim=-1)
        q, k = q * cos, k * cos
    scores = torch.einsum("bthc,bshc->bhts", q, k) / math.sqrt(hd)
    softcap = cfg["softcap"] if fs2 else 0.0  # the paper code never passes its softcap
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    lag = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    if alibi:  # flash-attn adds -slope * |i - j| after the softcap
        scores = scores - (alibi_slopes(heads) * 0.25)[:, None, None] * lag.abs()
    w = cfg["window_size"]
    left = w[0] if isinstance(w, list) else w
    allowed = (lag >= 0) & ((lag <= left) if left >= 0 else True)  # flash-attn (w, 0): w + 1 keys
    att = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    y = torch.einsum("bhts,bshc->bthc", att, v).reshape(B, T, d)
    return _linear(sd, f"{p}.c_proj", y)


def _stu(cfg, sd, p, x, bank):
    T = x.shape[1]
    phi = bank[:T]
    sgn = ((-1.0) ** torch.arange(T, dtype=F64))[None, :, None]
    fs2 = "n_embd" in cfg
    plus_only = fs2 and cfg["use_hankel_L"]
    if cfg["use_approx"]:
        m_in = sd[f"{p}.M_inputs"]
        tile = min([t for t in (cfg.get("d_in_tile"), cfg.get("d_out_tile")) if t] or [m_in.shape[0]])
        if fs2 and tile < m_in.shape[0]:  # tiled: diagonal blocks only
            blk = torch.arange(m_in.shape[0]) // tile
            m_in = m_in * (blk[:, None] == blk[None, :])
        u = x @ m_in
        phi_proj = phi @ sd[f"{p}.M_filters"]  # recomputed from M_filters (the paper code's setup_phi)
        y = _causal_conv(phi_proj, u)
        return y if plus_only else y + sgn * _causal_conv(phi_proj, sgn * u)
    K, d = phi.shape[1], x.shape[2]
    y = 0
    for k in range(K):
        kern = phi[:, k : k + 1].expand(T, d)
        y = y + _causal_conv(kern, x) @ sd[f"{p}.M_phi_plus"][k]
        if not plus_only:
            y = y + (sgn * _causal_conv(kern, sgn * x)) @ sd[f"{p}.M_phi_minus"][k]
    return y


def reference_logits(cfg: dict, sd: dict[str, torch.Tensor], bank: torch.Tensor, tokens: torch.Tensor,
                     eps: float | None = None) -> torch.Tensor:
    """Float64 logits of the reference model: pre-norm blocks, GELU-tanh gated MLP, RMSNorm with the
    machine epsilon of torch_dtype (nn.RMSNorm(eps=None)), the head tied to the embedding."""
    sd = {k: t.to(F64) for k, t in sd.items()}
    eps = DTYPE_EPS[cfg.get("torch_dtype", cfg.get("dtype"))] if eps is None else eps
    head = sd.get("lm_head.weight", sd.get("tok_emb.weight"))
    emb = sd.get("tok_emb.weight", head)
    x = emb[tokens]
    for i, kind in enumerate(layer_kinds(cfg)):
        p = f"layers.{i}"
        h = _rmsnorm(x, sd[f"{p}.{kind}_norm.weight"], eps)
        mixed = _attention(cfg, sd, f"{p}.attn", h) if kind == "attn" else _stu(cfg, sd, f"{p}.stu", h, bank)
        x = x + mixed
        h = _rmsnorm(x, sd[f"{p}.mlp_norm.weight"], eps)
        gate = F.gelu(_linear(sd, f"{p}.mlp.gate_proj", h), approximate="tanh")
        x = x + _linear(sd, f"{p}.mlp.down_proj", gate * _linear(sd, f"{p}.mlp.up_proj", h))
    x = _rmsnorm(x, sd["norm.weight"], eps)
    logits = x @ head.T
    return logits + sd["lm_head.bias"] if "lm_head.bias" in sd else logits
