"""Flash STU checkpoints of the reference implementations -> spectralds `LanguageModel` checkpoints.

`import_flash_stu(source)` reads a flash-stu-2 or SpectraLDS-paper source (`interop.source`), decides
what it computes (`interop.formats`), matches its filter bank to ours (`interop.filter_match`) and maps
every tensor to our keys; nothing of the source is left unused or guessed. Keys (both formats):
`tok_emb.weight`, `norm.weight`, `lm_head.weight` (tied: either one may be missing), per layer
`layers.{i}.` + `stu_norm`/`attn_norm`, `mlp_norm`, `mlp.{gate,up,down}_proj` (our w1, w3, w2),
`stu.M_phi_plus`/`M_phi_minus` (exact) or `stu.M_inputs` + one `stu.M_filters` (STU-T: the reference
shares it between the two branches, so both of ours get it; with Hankel-L in flash-stu-2 the minus
branch is off: zero), `attn.c_attn` ([q | k | v], heads-major, our layout) and `attn.c_proj`.
The paper code's `phi_proj` is not a parameter (computed at init, stale until `setup_phi()`): ours is
always recomputed from `M_filters`. Weights the mapping only re-indexes keep the source's dtype (a
float32 model loads them exactly); the paper code's cosine scale is folded into q and k in float32
(float64 for a float64 source).

`export_flash_stu2(model, out_dir)` is the way back (`interop.flash_stu_export`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from spectralds.errors import UserError
from spectralds.interop.filter_match import FilterMatch, match_filters, source_bank
from spectralds.interop.flash_stu_export import export_flash_stu2
from spectralds.interop.formats import SourceArch, cosine_scale, describe, detect_format, parse_config
from spectralds.interop.source import Source

__all__ = ["Imported", "build_model", "export_flash_stu2", "import_flash_stu", "model_hparams"]
# Buffers a source may hold that are recomputed, never weights: flash-stu-2's filter bank (read by
# filter_match), the paper code's RoPE table (its effect is the cosine fold, from `theta`).
_BUFFERS = ("phi", "freqs_cis")
_LAYER_BUFFERS = (".phi", ".sgn", ".flash_sgn", ".phi_fft")


@dataclass
class Imported:
    arch: SourceArch
    hparams: dict[str, Any]  # LanguageModel keyword arguments
    state_dict: dict[str, torch.Tensor]  # our keys; tied head and embedding share one tensor
    match: FilterMatch | None  # None: no STU layer
    notes: list[str] = field(default_factory=list)

    def summary(self, num_params: int | None = None) -> list[str]:
        lines = [f"source: {describe(self.arch)}"]
        if self.match is not None:
            lines.append(self.match.describe())
        lines += [f"note: {n}" for n in self.arch.notes + self.notes]
        if num_params is not None:
            lines.append(f"parameters: {num_params:,} ({num_params / 1e6:.4g}M)")
        return lines


def _pattern(names: list[str]) -> list[str]:
    """The shortest layer_pattern that `build_mixers` (pattern[i % len]) expands to `names`."""
    for p in range(1, len(names) + 1):
        if all(names[i] == names[i % p] for i in range(len(names))):
            return names[:p]
    return names


def model_hparams(arch: SourceArch, carry_filters: bool) -> dict[str, Any]:
    """LanguageModel keyword arguments computing what the source computes."""
    stu_name = "stu_t" if arch.approx else "stu"
    names = [stu_name if k == "stu" else "attn" for k in arch.kinds]
    layer_kwargs: dict[str, dict[str, Any]] = {}
    if "stu" in arch.kinds:
        layer_kwargs[stu_name] = {"variant": "hankel_L" if arch.hankel_L else "hankel"}
        if carry_filters:
            layer_kwargs[stu_name]["store_filters"] = True
    if "attn" in arch.kinds:
        attn = {"num_heads": arch.num_heads, "window_size": arch.window_size, "softcap": arch.softcap,
                "bias": arch.bias, "positions": "alibi" if arch.positions == "alibi" else "none"}
        if arch.positions == "alibi":
            attn["alibi_slope_scale"] = 0.25  # both references scale the standard slopes by 0.25
        layer_kwargs["attn"] = attn
    ratio = arch.mlp_hidden / arch.dim
    if int(ratio * arch.dim) != arch.mlp_hidden:
        raise UserError(f"MLP width {arch.mlp_hidden} is not reachable as int(mlp_ratio * {arch.dim})")
    return {
        "vocab_size": arch.vocab_size, "dim": arch.dim, "num_layers": arch.num_layers,
        "layer_pattern": _pattern(names), "seq_len": arch.seq_len, "num_filters": arch.num_filters,
        "layer_kwargs": layer_kwargs, "mlp_ratio": ratio, "dropout": arch.dropout,
        "tie_embeddings": arch.tied, "norm_eps": arch.norm_eps, "mlp_activation": "gelu_tanh",
        "mlp_bias": arch.bias, "head_bias": arch.bias,
    }


class _Mapper:
    """Takes source tensors by key (each at most once) and records which were used."""

    def __init__(self, source: Source, arch: SourceArch, match: FilterMatch | None) -> None:
        self.source, self.arch, self.match = source, arch, match
        self.used: set[str] = set()
        self.out: dict[str, torch.Tensor] = {}

    def take(self, key: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if key not in self.source:
            raise UserError(f"the {self.arch.format} source has no tensor {key!r}, which its config implies")
        t = self.source.get(key)
        if shape is not None and tuple(t.shape) != shape:
            raise UserError(f"source tensor {key!r} has shape {tuple(t.shape)}, the config implies {shape}")
        if not t.is_floating_point():
            raise UserError(f"source tensor {key!r} is {t.dtype}, not floating point")
        self.used.add(key)
        # A view into a larger storage would be saved whole by torch.save: copy only then.
        return t.clone() if t.untyped_storage().nbytes() > t.nbytes else t

    def linear(self, ours: str, theirs: str, out_dim: int, in_dim: int, bias: bool) -> None:
        self.out[f"{ours}.weight"] = self.take(f"{theirs}.weight", (out_dim, in_dim))
        if bias:
            self.out[f"{ours}.bias"] = self.take(f"{theirs}.bias", (out_dim,))

    def filters_first(self, t: torch.Tensor) -> torch.Tensor:
        """Source filter index j -> ours perm[j], times its sign (exact: only +-1 and a permutation)."""
        if self.match is None or not self.match.ours:
            return t
        out = torch.empty_like(t)
        signs = self.match.signs.to(t.dtype).view(-1, *[1] * (t.dim() - 1))
        out[self.match.perm] = t * signs
        return out


def _stu(m: _Mapper, i: int, ours: str) -> None:
    a, k, d = m.arch, m.arch.num_filters, m.arch.dim
    theirs = f"layers.{i}.stu"
    if a.approx:
        inputs = m.take(f"{theirs}.M_inputs", (d, d))
        if a.tile is not None:  # flash-stu-2's tiled forward uses only the diagonal blocks of M_inputs
            block = torch.arange(d) // a.tile
            inputs = inputs * (block[:, None] == block[None, :]).to(inputs.dtype)
        m.out[f"{ours}.M_inputs"] = inputs
        plus = m.filters_first(m.take(f"{theirs}.M_filters", (k, d)))
        m.out[f"{ours}.M_filters_plus"] = plus
        m.out[f"{ours}.M_filters_minus"] = plus if a.minus_branch else torch.zeros_like(plus)
    else:
        m.out[f"{ours}.M_phi_plus"] = m.filters_first(m.take(f"{theirs}.M_phi_plus", (k, d, d)))
        minus_key = f"{theirs}.M_phi_minus"
        if a.minus_branch or minus_key in m.source:
            m.out[f"{ours}.M_phi_minus"] = m.filters_first(m.take(minus_key, (k, d, d)))
        else:  # flash-stu-2 with Hankel-L: the "+" branch alone
            m.out[f"{ours}.M_phi_minus"] = torch.zeros_like(m.out[f"{ours}.M_phi_plus"])
    if m.match is not None and not m.match.ours:
        m.out[f"{ours}.phi"] = m.match.bank


def _attn(m: _Mapper, i: int, ours: str) -> None:
    a, d = m.arch, m.arch.dim
    theirs = f"layers.{i}.attn"
    m.linear(f"{ours}.qkv", f"{theirs}.c_attn", 3 * d, d, a.bias)
    m.linear(f"{ours}.o_proj", f"{theirs}.c_proj", d, d, a.bias)
    if a.positions == "cosine":  # q and k scaled per channel: fold the scale into their rows (and biases)
        scale = cosine_scale(a.num_heads, d // a.num_heads, a.theta).flatten()
        scale = torch.cat([scale, scale, torch.ones(d, dtype=torch.float64)])
        for key in (f"{ours}.qkv.weight", f"{ours}.qkv.bias"):
            if key in m.out:
                t = m.out[key]
                folded = t.double() * scale.view(-1, *[1] * (t.dim() - 1))
                m.out[key] = folded.to(torch.promote_types(t.dtype, torch.float32))


def _layer_kind(source: Source, i: int) -> str | None:
    kinds = [k for k in ("stu", "attn") if f"layers.{i}.{k}_norm.weight" in source]
    return kinds[0] if len(kinds) == 1 else None


def _embedding(m: _Mapper) -> None:
    a = m.arch
    shape = (a.vocab_size, a.dim)
    has_emb, has_head = "tok_emb.weight" in m.source, "lm_head.weight" in m.source
    if a.tied:
        if has_emb and has_head:
            emb, head = m.take("tok_emb.weight", shape), m.take("lm_head.weight", shape)
            if not torch.equal(emb, head):
                raise UserError("the config ties the embedding and the head, but the source's tok_emb.weight "
                                "and lm_head.weight differ")
        elif not (has_emb or has_head):
            raise UserError("the source has neither tok_emb.weight nor lm_head.weight")
        # The head is the tied parameter in both references; a saved directory may hold either key.
        m.out["embed.weight"] = m.take("tok_emb.weight" if has_emb else "lm_head.weight", shape)
        m.out["head.weight"] = m.out["embed.weight"]
    else:
        m.out["embed.weight"] = m.take("tok_emb.weight", shape)
        m.out["head.weight"] = m.take("lm_head.weight", shape)
    if a.bias:
        m.out["head.bias"] = m.take("lm_head.bias", (a.vocab_size,))
    m.out["norm.weight"] = m.take("norm.weight", (a.dim,))


def _map(source: Source, arch: SourceArch, match: FilterMatch | None) -> dict[str, torch.Tensor]:
    m = _Mapper(source, arch, match)
    _embedding(m)
    d, h = arch.dim, arch.mlp_hidden
    for i, kind in enumerate(arch.kinds):
        found = _layer_kind(source, i)
        if found != kind:
            what = {"stu": "an STU", "attn": "attention", None: "neither an STU nor attention"}[found]
            field_ = "use_attn" if arch.format == "flash-stu-2" or i % 2 else "all_attn"
            wanted = "an STU" if kind == "stu" else "attention"
            raise UserError(f"layer {i}: the config ({field_}) makes it {wanted}, but the weights: {what}")
        p, ours = f"layers.{i}", f"blocks.{i}"
        m.out[f"{ours}.norm1.weight"] = m.take(f"{p}.{kind}_norm.weight", (d,))
        m.out[f"{ours}.norm2.weight"] = m.take(f"{p}.mlp_norm.weight", (d,))
        m.linear(f"{ours}.mlp.w1", f"{p}.mlp.gate_proj", h, d, arch.bias)
        m.linear(f"{ours}.mlp.w3", f"{p}.mlp.up_proj", h, d, arch.bias)
        m.linear(f"{ours}.mlp.w2", f"{p}.mlp.down_proj", d, h, arch.bias)
        (_stu if kind == "stu" else _attn)(m, i, f"{ours}.mixer")
    ignored = [k for k in source.keys() if k in _BUFFERS or k.endswith(_LAYER_BUFFERS)]
    left = [k for k in source.keys() if k not in m.used and k not in ignored]
    if left:
        more = f" and {len(left) - 1} more" if len(left) > 1 else ""
        raise UserError(f"source tensor {left[0]!r}{more} is not part of the {arch.format} architecture its "
                        "config describes")
    return m.out


def import_flash_stu(
    source: str | os.PathLike,
    fmt: str = "auto",
    config: str | os.PathLike | None = None,
    filters: str | os.PathLike = "auto",
    norm_eps: float | None = None,
) -> Imported:
    """Read a reference checkpoint and map it (see the module doc); nothing is written."""
    with Source(source, config) as src:
        arch = parse_config(src.config, detect_format(src.config, fmt), norm_eps)
        match = None
        if "stu" in arch.kinds:
            bank, origin = source_bank(src, arch, filters)
            match = match_filters(bank, arch.hankel_L, origin)
            if not match.ours:
                match.bank = bank.clone()  # the model keeps it: not a view of the file we close
        state = _map(src, arch, match)
        notes = [f"config: {src.config_path}"]
        if arch.window_size is not None:
            notes.append(f"window: flash-attn (w, 0) with w = {arch.window_size - 1} attends to "
                         f"{arch.window_size} keys, so window_size = {arch.window_size}")
        carry = match is not None and not match.ours  # (safe_open's tensors outlive the handle)
        return Imported(arch, model_hparams(arch, carry), state, match, notes)


def build_model(imported: Imported, dtype: torch.dtype = torch.float32, device: str | torch.device = "meta"):
    """The LanguageModel for `imported.hparams`; with a real device its weights are loaded (strict), on
    "meta" (the default) none are allocated: keys and shapes are checked against the mapping."""
    from spectralds.layers.filter_bank import cached_filters
    from spectralds.models import LanguageModel

    for name, kwargs in imported.hparams["layer_kwargs"].items():
        if name in ("stu", "stu_t"):  # the filters, computed before a meta-device build could intercept them
            cached_filters(imported.hparams["seq_len"], imported.hparams["num_filters"], kwargs["variant"])
    if str(device) == "meta":
        with torch.device("meta"):
            model = LanguageModel(**imported.hparams)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in imported.state_dict.items()}
        if expected != got:
            wrong = sorted(set(expected) ^ set(got)) or [k for k in expected if expected[k] != got[k]]
            raise RuntimeError(f"the mapping does not fit LanguageModel: {wrong[:3]}")  # a bug, not input
        return model
    model = LanguageModel(**imported.hparams).to(device=device, dtype=dtype)
    model.load_state_dict(imported.state_dict, strict=True)
    return model.eval()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


def to_checkpoint(imported: Imported, tokenizer: str) -> dict[str, Any]:
    """A Lightning weights-only checkpoint of the imported model, as `spectralds fit` writes them:
    `load_model` rebuilds it, `generate` and `eval` read their tokenizer from it."""
    import lightning

    return {
        "state_dict": imported.state_dict,
        "hyper_parameters": {"_class_path": "spectralds.models.LanguageModel", **imported.hparams},
        "datamodule_hyper_parameters": {"tokenizer": tokenizer},
        "spectralds_layers": {},  # the layers are the ones the hyperparameters build
        "spectralds_model": "LanguageModel",
        "spectralds_import": {"format": imported.arch.format, "summary": imported.summary()},
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": lightning.__version__,
    }
