"""import_flash_stu judged by the references' math: reference-format state dicts (interop_reference.py)
against an independent float64 forward written from the facts files; one test per row of the import
table of interop-facts.md, each also showing the row matters (leaving it out gives other logits)."""

import json

import numpy as np
import pytest
import torch
from interop_reference import (
    F64,
    fs2_config,
    hankel_bank,
    paper_config,
    random_state_dict,
    reference_logits,
    write_source,
)

from spectralds.errors import UserError
from spectralds.filters import spectral_filters
from spectralds.interop.flash_stu import build_model, import_flash_stu

TOKENS = torch.randint(0, 96, (2, 64), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECTRALDS_CACHE_DIR", str(tmp_path / "cache"))


def ours(imported, dtype=F64, tokens=TOKENS, **hparams) -> torch.Tensor:
    """Logits of the imported model (hparams overridden to show what a row changes). In float64 the
    layers that use our filters get them in float64 (a layer keeps float32-rounded filters otherwise)."""
    imported.hparams.update(hparams)
    model = build_model(imported, dtype, "cpu")
    if dtype == F64:
        for block in model.blocks:
            m = block.mixer
            if hasattr(m, "phi") and not _stored(imported):
                m.phi = spectral_filters(m.seq_len, m.num_filters, m.variant).to(F64)
    with torch.no_grad():
        return model(tokens).to(F64)


def _stored(imported) -> bool:
    return any(kw.get("store_filters") for kw in imported.hparams["layer_kwargs"].values())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def source(tmp_path, cfg, seed=0, bank=None, with_phi=True, **sd_kwargs):
    """A flash-stu-2 directory (with its `phi`) or a paper state dict file; returns (path, sd, bank)."""
    sd = random_state_dict(cfg, seed, **sd_kwargs)
    bank = hankel_bank(cfg["seq_len"], cfg["num_eigh"], cfg["use_hankel_L"]) if bank is None else bank
    stored = {**sd, "phi": bank} if with_phi and "n_embd" in cfg else sd
    path = write_source(tmp_path / "src", cfg, stored)
    return (tmp_path / "src" if "n_embd" in cfg else path), sd, bank


def paper_bank_file(tmp_path, cfg, flip=(1, 4)) -> tuple[str, torch.Tensor]:
    """The bank the paper model ran with, as an .npy file: eigh's, with some columns' signs flipped (as
    its shipped spectral_filters.npy differs from CPU LAPACK)."""
    bank = hankel_bank(cfg["seq_len"], cfg["num_eigh"], cfg["use_hankel_L"]).clone()
    bank[:, list(flip)] *= -1
    path = tmp_path / "spectral_filters.npy"
    np.save(path, bank.numpy())
    return str(path), bank


@pytest.mark.parametrize("approx", [True, False], ids=["stu_t", "stu"])
def test_fs2_stu_parity_float64_and_float32(tmp_path, approx):
    cfg = fs2_config(use_attn=False, use_approx=approx)
    path, sd, bank = source(tmp_path, cfg)
    imported = import_flash_stu(path)
    ref = reference_logits(cfg, sd, bank, TOKENS)
    assert rel(ours(imported), ref) < 1e-10
    assert rel(ours(imported, torch.float32), ref) < 2e-5  # the checkpoint as generate/eval run it


def test_row_mlp_gate_is_gelu_tanh(tmp_path):
    cfg = fs2_config(use_attn=False)
    path, sd, bank = source(tmp_path, cfg)
    imported = import_flash_stu(path)
    assert imported.hparams["mlp_activation"] == "gelu_tanh"
    ref = reference_logits(cfg, sd, bank, TOKENS)
    assert rel(ours(imported), ref) < 1e-10
    assert rel(ours(imported, mlp_activation="silu"), ref) > 1e-3


def test_row_biases_on_every_linear(tmp_path):
    cfg = fs2_config(use_attn=False, bias=True)
    path, sd, bank = source(tmp_path, cfg)
    imported = import_flash_stu(path)
    assert imported.hparams["mlp_bias"] and imported.hparams["head_bias"]
    assert rel(ours(imported), reference_logits(cfg, sd, bank, TOKENS)) < 1e-10


@pytest.mark.parametrize("dtype,eps", [("float32", 2.0**-23), ("bfloat16", 2.0**-7), ("dtype", 2.0**-7)])
def test_row_rmsnorm_eps_is_the_sources_dtype_eps(tmp_path, dtype, eps):
    cfg = fs2_config(use_attn=False, torch_dtype=dtype)
    if dtype == "dtype":  # transformers 5 writes `dtype` instead of `torch_dtype`
        cfg.pop("torch_dtype")
        cfg["dtype"] = dtype = "bfloat16"
    path, sd, bank = source(tmp_path, cfg)
    imported = import_flash_stu(path)
    assert imported.arch.norm_eps == eps and imported.hparams["norm_eps"] == eps
    ref = reference_logits(cfg, sd, bank, TOKENS)
    assert rel(ours(imported), ref) < 1e-10
    if dtype == "bfloat16":
        assert rel(ours(imported, norm_eps=1e-6), ref) > 1e-4


def test_row_stu_t_shares_m_filters_between_branches(tmp_path):
    cfg = fs2_config(use_attn=False)
    path, sd, bank = source(tmp_path, cfg)
    imported = import_flash_stu(path)
    plus, minus = (imported.state_dict[f"blocks.0.mixer.M_filters_{b}"] for b in ("plus", "minus"))
    assert torch.equal(plus, minus)
    # the kernel of a shared projection: 2 phi_proj at even lags, 0 at odd ones
    model = build_model(imported, F64, "cpu")
    kernel = model.blocks[0].mixer.channel_filters()
    assert kernel[1::2].abs().max() < 1e-12 * kernel.abs().max()


@pytest.mark.parametrize("approx", [True, False], ids=["stu_t", "stu"])
def test_row_hankel_L_flash_stu2_plus_branch_only(tmp_path, approx):
    cfg = fs2_config(use_attn=False, use_hankel_L=True, use_approx=approx)
    path, sd, bank = source(tmp_path, cfg)
    imported = import_flash_stu(path)
    minus = imported.state_dict["blocks.0.mixer." + ("M_filters_minus" if approx else "M_phi_minus")]
    assert not minus.any()
    assert imported.hparams["layer_kwargs"]["stu_t" if approx else "stu"]["variant"] == "hankel_L"
    assert rel(ours(imported), reference_logits(cfg, sd, bank, TOKENS)) < 1e-10


def test_row_filters_flash_stu2_lapack_signs_mapped_by_measure(tmp_path):
    cfg = fs2_config(use_attn=False)
    bank = hankel_bank(64, 6, False)
    bank[:, [0, 3]] *= -1  # whatever signs the source's eigensolver gave
    path, sd, bank = source(tmp_path, cfg, bank=bank)
    imported = import_flash_stu(path)
    assert imported.match.ours and imported.match.deviation < 1e-12
    assert imported.match.perm.tolist() == [5, 4, 3, 2, 1, 0]  # ascending -> our descending order
    assert rel(ours(imported), reference_logits(cfg, sd, bank, TOKENS)) < 1e-10


def test_row_filters_paper_bank_file_and_stale_phi_proj(tmp_path):
    """The paper code saves no bank: the one it ran with comes from a file (signs flipped on two
    columns); its stale phi_proj is never used, ours comes from the saved M_filters."""
    cfg = paper_config(use_attn=False)
    bank_file, bank = paper_bank_file(tmp_path, cfg)
    path, sd, _ = source(tmp_path, cfg)
    with pytest.raises(UserError, match="--filters"):
        import_flash_stu(path)
    imported = import_flash_stu(path, filters=bank_file)
    ref = reference_logits(cfg, sd, bank, TOKENS)
    assert rel(ours(imported), ref) < 1e-10
    wrong = import_flash_stu(path, filters="eigh")  # LAPACK's signs: not what this model ran with
    assert rel(ours(wrong), ref) > 1e-3


@pytest.mark.parametrize("which", ["tok_emb", "lm_head", "both"])
def test_row_tied_head_in_either_direction(tmp_path, which):
    cfg = fs2_config(use_attn=False)
    sd = random_state_dict(cfg, 3, both_heads=True)
    if which != "both":
        sd.pop("lm_head.weight" if which == "tok_emb" else "tok_emb.weight")
    bank = hankel_bank(64, 6, False)
    write_source(tmp_path / "src", cfg, {**sd, "phi": bank})
    imported = import_flash_stu(tmp_path / "src")
    assert imported.state_dict["head.weight"] is imported.state_dict["embed.weight"]
    assert rel(ours(imported), reference_logits(cfg, sd, bank, TOKENS)) < 1e-10


def test_tied_head_that_differs_is_refused(tmp_path):
    cfg = fs2_config(use_attn=False)
    sd = random_state_dict(cfg, 3, both_heads=True)
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    write_source(tmp_path / "src", cfg, {**sd, "phi": hankel_bank(64, 6, False)})
    with pytest.raises(UserError, match="differ"):
        import_flash_stu(tmp_path / "src")


def test_paper_untied_head_and_torch_file(tmp_path):
    cfg = paper_config(use_attn=False, weight_tying=False, use_approx=False)
    bank_file, bank = paper_bank_file(tmp_path, cfg)
    sd = random_state_dict(cfg, 4)
    path = write_source(tmp_path / "src", cfg, sd, name="model.pt")
    imported = import_flash_stu(path, filters=bank_file)
    assert imported.hparams["tie_embeddings"] is False
    assert rel(ours(imported), reference_logits(cfg, sd, bank, TOKENS)) < 1e-10


def test_fs2_tiled_stu_t_uses_diagonal_blocks(tmp_path):
    cfg = fs2_config(use_attn=False, d_in_tile=8)
    path, sd, bank = source(tmp_path, cfg)
    imported = import_flash_stu(path)
    assert rel(ours(imported), reference_logits(cfg, sd, bank, TOKENS)) < 1e-10


def test_config_that_disagrees_with_the_weights_names_the_field(tmp_path):
    cfg = fs2_config(use_attn=False)
    path, _, _ = source(tmp_path, cfg)
    (path / "config.json").write_text(json.dumps({**cfg, "use_attn": True}))
    with pytest.raises(UserError, match="use_attn"):
        import_flash_stu(path)


def test_unused_source_tensor_is_refused(tmp_path):
    cfg = fs2_config(use_attn=False)
    sd = random_state_dict(cfg, 0)
    extra = {"phi": hankel_bank(64, 6, False), "extra.weight": torch.ones(3)}
    write_source(tmp_path / "src", cfg, {**sd, **extra})
    with pytest.raises(UserError, match="extra.weight"):
        import_flash_stu(tmp_path / "src")


@pytest.mark.parametrize("bad,match", [
    ({"n_embd": None}, "n_embd"),
    ({"stu_enable_mlp_sandwich": True}, "stu_enable_mlp_sandwich"),
    ({"mlp_scale": 1.3}, "mlp_scale"),
    ({"torch_dtype": "int8"}, "torch_dtype"),
])
def test_bad_configs_are_one_line_errors_naming_the_field(tmp_path, bad, match):
    cfg = fs2_config(use_attn=False)
    path, _, _ = source(tmp_path, cfg)
    broken = {k: v for k, v in {**cfg, **bad}.items() if v is not None or k not in bad}
    (path / "config.json").write_text(json.dumps(broken))
    with pytest.raises(UserError, match=match) as err:
        import_flash_stu(path)
    assert "\n" not in str(err.value)


def test_unknown_format_is_refused(tmp_path):
    path, _, _ = source(tmp_path, fs2_config(use_attn=False))
    with pytest.raises(UserError, match="unknown format"):
        import_flash_stu(path, fmt="mamba")


def _attn_kwargs(imported, **over):
    kwargs = {k: dict(v) for k, v in imported.hparams["layer_kwargs"].items()}
    kwargs["attn"].update(over)
    return kwargs


@pytest.mark.parametrize("heads,dim", [(4, 32), (6, 48)], ids=["4heads", "6heads"])
def test_fs2_hybrid_parity(tmp_path, heads, dim):
    cfg = fs2_config(n_heads=heads, n_embd=dim)
    path, sd, bank = source(tmp_path, cfg)
    imported = import_flash_stu(path)
    ref = reference_logits(cfg, sd, bank, TOKENS)
    assert rel(ours(imported), ref) < 1e-10
    assert rel(ours(imported, torch.float32), ref) < 2e-5


def test_row_positions_fs2_alibi_quarter_slopes(tmp_path):
    cfg = fs2_config()
    path, sd, bank = source(tmp_path, cfg)
    imported = import_flash_stu(path)
    assert imported.hparams["layer_kwargs"]["attn"]["positions"] == "alibi"
    ref = reference_logits(cfg, sd, bank, TOKENS)
    assert rel(ours(imported), ref) < 1e-10
    unscaled = _attn_kwargs(imported, alibi_slope_scale=1.0)
    assert rel(ours(imported, layer_kwargs=unscaled), ref) > 1e-3


@pytest.mark.parametrize("alibi", [False, True], ids=["rope_bug_cosine", "use_alibi"])
def test_row_positions_paper_cosine_fold_or_alibi(tmp_path, alibi):
    cfg = paper_config(use_alibi=alibi, theta=3.0)  # a small theta: the cosines differ visibly from 1
    bank_file, bank = paper_bank_file(tmp_path, cfg)
    path, sd, _ = source(tmp_path, cfg)
    imported = import_flash_stu(path, filters=bank_file)
    ref = reference_logits(cfg, sd, bank, TOKENS)
    assert rel(ours(imported), ref) < 1e-10
    assert rel(ours(imported, torch.float32), ref) < 2e-5
    if not alibi:  # the fold is what makes it right: the unscaled q/k rows give other logits
        folded = imported.state_dict["blocks.1.mixer.qkv.weight"]
        assert not torch.equal(folded[:32].to(F64), sd["layers.1.attn.c_attn.weight"][:32])
        assert torch.equal(folded[64:].to(F64), sd["layers.1.attn.c_attn.weight"][64:])  # v untouched
        imported.state_dict["blocks.1.mixer.qkv.weight"] = sd["layers.1.attn.c_attn.weight"]
        assert rel(ours(imported), ref) > 1e-4


@pytest.mark.parametrize("fmt", ["flash-stu-2", "spectralds-paper"])
def test_row_window_w_plus_one_keys(tmp_path, fmt):
    cfg = fs2_config(window_size=5) if fmt == "flash-stu-2" else paper_config(window_size=5)
    kwargs = {}
    if fmt != "flash-stu-2":
        kwargs["filters"], bank = paper_bank_file(tmp_path, cfg)
    path, sd, fs2_bank = source(tmp_path, cfg)
    imported = import_flash_stu(path, **kwargs)
    assert imported.hparams["layer_kwargs"]["attn"]["window_size"] == 6
    ref = reference_logits(cfg, sd, fs2_bank if fmt == "flash-stu-2" else bank, TOKENS)
    assert rel(ours(imported), ref) < 1e-10
    assert rel(ours(imported, layer_kwargs=_attn_kwargs(imported, window_size=5)), ref) > 1e-4


def test_row_softcap_fs2_applied(tmp_path):
    cfg = fs2_config(softcap=0.5)
    path, sd, bank = source(tmp_path, cfg)
    imported = import_flash_stu(path)
    assert imported.hparams["layer_kwargs"]["attn"]["softcap"] == 0.5
    ref = reference_logits(cfg, sd, bank, TOKENS)
    assert rel(ours(imported), ref) < 1e-10
    assert rel(ours(imported, layer_kwargs=_attn_kwargs(imported, softcap=None)), ref) > 1e-4


def test_row_softcap_paper_never_applied(tmp_path):
    cfg = paper_config(softcap=0.5)
    bank_file, bank = paper_bank_file(tmp_path, cfg)
    path, sd, _ = source(tmp_path, cfg)
    imported = import_flash_stu(path, filters=bank_file)
    assert imported.hparams["layer_kwargs"]["attn"]["softcap"] is None
    assert any("not applied" in n for n in imported.arch.notes)
    ref = reference_logits(cfg, sd, bank, TOKENS)
    assert rel(ours(imported), ref) < 1e-10
    assert rel(ours(imported, layer_kwargs=_attn_kwargs(imported, softcap=0.5)), ref) > 1e-4


@pytest.mark.parametrize("kind", ["bfloat16", "foreign"])
def test_row_filters_not_ours_are_carried_in_the_checkpoint(tmp_path, kind):
    """A bank that is not ours up to order and sign (flash-stu-2 rounds it to its torch_dtype; or any other
    bank) is stored with the model (store_filters) and used as is."""
    cfg = fs2_config()
    bank = hankel_bank(64, 6, False)
    if kind == "bfloat16":
        bank = bank.to(torch.bfloat16).to(F64)
    else:
        bank = torch.linalg.qr(torch.randn(64, 6, generator=torch.Generator().manual_seed(5), dtype=F64))[0]
    path, sd, bank = source(tmp_path, cfg, bank=bank)
    imported = import_flash_stu(path)
    assert not imported.match.ours and imported.hparams["layer_kwargs"]["stu_t"]["store_filters"]
    assert "carried" in imported.match.describe()
    assert torch.equal(imported.state_dict["blocks.0.mixer.phi"].to(F64), bank)
    ref = reference_logits(cfg, sd, bank, TOKENS)
    assert rel(ours(imported), ref) < 1e-10
    assert rel(ours(imported, torch.float32), ref) < 2e-5


def test_sharded_directory_and_filter_path_file(tmp_path):
    """A save_pretrained directory in shards (index.json), its bank in the config's filter_path file
    (relative: read beside the weights) instead of a `phi` tensor."""
    from safetensors.torch import save_file

    cfg = fs2_config(filter_path="filters.pt")
    sd, bank = random_state_dict(cfg, 9), hankel_bank(64, 6, False)
    src = tmp_path / "src"
    src.mkdir()
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    for name, part in shards.items():
        save_file({k: sd[k] for k in part}, str(src / name))
    weight_map = {k: name for name, part in shards.items() for k in part}
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (src / "config.json").write_text(json.dumps(cfg))
    torch.save({"phi": bank, "shape": [64, 6]}, src / "filters.pt")
    imported = import_flash_stu(src)
    assert "filters.pt" in imported.match.origin
    assert rel(ours(imported), reference_logits(cfg, sd, bank, TOKENS)) < 1e-10
    (src / "filters.pt").unlink()
    with pytest.raises(UserError, match="filters.pt"):
        import_flash_stu(src)


def test_fs2_filter_file_wins_over_the_saved_phi(tmp_path):
    """flash-stu-2's layers use the bank of its filter_path file; a different saved `phi` is named."""
    cfg = fs2_config(use_attn=False, filter_path="filters.pt")
    file_bank = hankel_bank(64, 6, False)
    saved = torch.linalg.qr(torch.randn(64, 6, generator=torch.Generator().manual_seed(2), dtype=F64))[0]
    path, sd, _ = source(tmp_path, cfg, bank=saved)
    torch.save({"phi": file_bank}, path / "filters.pt")
    imported = import_flash_stu(path)
    assert imported.match.ours and "differs" in imported.match.origin
    assert rel(ours(imported), reference_logits(cfg, sd, file_bank, TOKENS)) < 1e-10
