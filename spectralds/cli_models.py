"""`spectralds import-model`: a Flash STU checkpoint of the reference implementations -> a spectralds
checkpoint that `generate`, `eval` and distillation read like one written by `spectralds fit`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from spectralds.cli_signature import library_defaults
from spectralds.errors import UserError, check_float
from spectralds.interop.flash_stu import import_flash_stu
from spectralds.interop.formats import FORMATS
from spectralds.io import check_output_path

FORMAT_CHOICES = ("auto", *FORMATS)  # auto: told from the source's config

IMPORT_DEFAULTS = library_defaults(import_flash_stu)


def _tokenizer(spec: str | None, vocab_size: int) -> str:
    from spectralds.data import build_tokenizer

    if spec is None:
        if vocab_size != 256:
            raise UserError(f"the source's vocabulary has {vocab_size} ids: pass --tokenizer (a .tiktoken "
                            "or tokenizer.json file; both reference LMs use o200k_base.tiktoken) or 'byte'")
        spec = "byte"
    if spec == "bpe":
        raise UserError("--tokenizer bpe trains a new tokenizer; give the tokenizer file the source used")
    tokenizer = build_tokenizer(spec)
    if tokenizer.vocab_size > vocab_size:
        raise UserError(f"--tokenizer {spec} has {tokenizer.vocab_size} tokens, more than the source's "
                        f"vocab_size {vocab_size}")
    return spec if spec == "byte" else str(Path(spec).expanduser().resolve())


def import_model(
    source: str,
    *,
    out: str,
    format: Literal[FORMAT_CHOICES] = IMPORT_DEFAULTS["fmt"],
    config: str | None = IMPORT_DEFAULTS["config"],
    filters: str = IMPORT_DEFAULTS["filters"],
    tokenizer: str | None = None,
    norm_eps: float | None = IMPORT_DEFAULTS["norm_eps"],
) -> None:
    """Read a Flash STU model written by flash-stu-2 (a save_pretrained directory) or by the SpectraLDS paper
    code (a safetensors or torch state dict with its config.json), map every tensor to a spectralds
    LanguageModel computing the same function (the references' quirks included), print what was imported
    and write a spectralds checkpoint.

    Args:
        source: a save_pretrained directory, or a .safetensors / .pt state dict
        out: the checkpoint to write (.ckpt); never the source itself
        format: the source's format; auto: flash-stu-2 when the config has n_embd, spectralds-paper when it
            has dim and num_layers
        config: the source's config.json (None: config.json in the directory or beside the file)
        filters: the filter bank the source ran with: auto (flash-stu-2's saved 'phi' tensor, else its
            filter_path file; the paper code saves none, so it needs one of the others), a file (.npy, .pt,
            .safetensors; e.g. SpectraLDS's models/spectral_filters.npy) or 'eigh' (recomputed here as the
            reference does, by dense eigh: minutes at seq_len 8192; its eigenvector signs may differ from
            the source machine's)
        tokenizer: the tokenizer recorded in the checkpoint for generate/eval: 'byte', or a path to a
            .tiktoken or tokenizer.json file (stored as an absolute path; both reference LMs use
            o200k_base.tiktoken). Its token count must fit the source's vocab_size. None: 'byte' when the
            vocabulary has exactly 256 ids (as byte-level models do), otherwise this option is required
        norm_eps: RMSNorm epsilon (None: the machine epsilon of the source's torch_dtype, which the
            references' nn.RMSNorm(eps=None) used; give 1e-6 for a model trained with Liger's RMSNorm)
    """
    from spectralds.checkpoint_io import AtomicCheckpointIO
    from spectralds.interop.flash_stu import build_model, count_parameters, to_checkpoint
    from spectralds.interop.source import Source

    if norm_eps is not None:
        check_float("--norm-eps", norm_eps, minimum=0.0)
    out_path = check_output_path(out, make_parents=True)  # before any work
    with Source(source, config) as src:  # the output must not be one of the source's files
        inputs = {f.resolve() for f in src.files} | {src.config_path.resolve()}
        vocab_size = src.config.get("vocab_size")
    if out_path.resolve() in inputs:
        raise UserError(f"refusing to write {out_path}: it is the source's own file")
    if isinstance(vocab_size, int):  # the tokenizer is checked before the weights are read
        recorded = _tokenizer(tokenizer, vocab_size)
    imported = import_flash_stu(source, format, config, filters, norm_eps)
    if not isinstance(vocab_size, int):  # the import named the bad field already; kept for type checkers
        recorded = _tokenizer(tokenizer, imported.arch.vocab_size)
    model = build_model(imported)  # on the meta device: keys and shapes checked, nothing allocated
    for line in imported.summary(count_parameters(model)):
        print(line)
    hp = imported.hparams
    print(f"spectralds LanguageModel: layer_pattern {hp['layer_pattern']}, dim {hp['dim']}, "
          f"{hp['num_layers']} layers, mlp_ratio {hp['mlp_ratio']:g} ({hp['mlp_activation']}), "
          f"norm_eps {hp['norm_eps']:.3g}, tied head {hp['tie_embeddings']}, bias {hp['mlp_bias']}, "
          f"layer_kwargs {hp['layer_kwargs']}")
    print(f"tokenizer: {recorded}")
    AtomicCheckpointIO().save_checkpoint(to_checkpoint(imported, recorded), out_path)
    print(f"wrote {out_path}")
