"""`spectralds import-model`: a Flash STU checkpoint of the reference implementations -> a spectralds
checkpoint that `generate`, `eval` and distillation read like one written by `spectralds fit`."""

from __future__ import annotations

from pathlib import Path

from spectralds.cli_errors import CommandParser
from spectralds.errors import UserError, check_float
from spectralds.io import check_output_path

_TOKENIZER_HELP = (
    "the tokenizer recorded in the checkpoint for generate/eval: 'byte', or a path to a .tiktoken or "
    "tokenizer.json file (stored as an absolute path; both reference LMs use o200k_base.tiktoken). Its token "
    "count must fit the source's vocab_size. None: 'byte' when the vocabulary has exactly 256 ids (as "
    "byte-level models do), otherwise this option is required"
)


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


def import_model_main(argv: list[str]) -> None:
    """Entry point of the `import-model` subcommand (argv without the subcommand name)."""
    from spectralds.checkpoint_io import AtomicCheckpointIO
    from spectralds.interop.flash_stu import build_model, count_parameters, import_flash_stu, to_checkpoint
    from spectralds.interop.formats import FORMATS
    from spectralds.interop.source import Source

    p = CommandParser(
        "spectralds import-model",
        "Read a Flash STU model written by flash-stu-2 (a save_pretrained directory) or by the "
        "SpectraLDS paper code (a safetensors or torch state dict with its config.json), map every tensor "
        "to a spectralds LanguageModel computing the same function (the references' quirks included), "
        "print what was imported and write a spectralds checkpoint.",
    )
    p.add_argument("source", help="a save_pretrained directory, or a .safetensors / .pt state dict")
    p.add_argument("--out", required=True, help="the checkpoint to write (.ckpt); never the source itself")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS),
                   help="the source's format; auto: flash-stu-2 when the config has n_embd, spectralds-paper "
                   "when it has dim and num_layers")
    p.add_argument("--config", default=None,
                   help="the source's config.json (None: config.json in the directory or beside the file)")
    p.add_argument("--filters", default="auto",
                   help="the filter bank the source ran with: auto (flash-stu-2's saved 'phi' tensor, else "
                   "its filter_path file; the paper code saves none, so it needs one of the others), a file "
                   "(.npy, .pt, .safetensors; e.g. SpectraLDS's models/spectral_filters.npy) or 'eigh' "
                   "(recomputed here as the reference does, by dense eigh: minutes at seq_len 8192; its "
                   "eigenvector signs may differ from the source machine's)")
    p.add_argument("--tokenizer", default=None, help=_TOKENIZER_HELP)
    p.add_argument("--norm-eps", type=float, default=None,
                   help="RMSNorm epsilon (None: the machine epsilon of the source's torch_dtype, which "
                   "the references' nn.RMSNorm(eps=None) used; give 1e-6 for a model trained with Liger's "
                   "RMSNorm)")
    a = p.parse_args(argv)
    if a.norm_eps is not None:
        check_float("--norm-eps", a.norm_eps, minimum=0.0)
    out = check_output_path(a.out, make_parents=True)  # before any work
    with Source(a.source, a.config) as src:  # the output must not be one of the source's files
        inputs = {f.resolve() for f in src.files} | {src.config_path.resolve()}
        vocab_size = src.config.get("vocab_size")
    if out.resolve() in inputs:
        raise UserError(f"refusing to write {out}: it is the source's own file")
    if isinstance(vocab_size, int):  # the tokenizer is checked before the weights are read
        tokenizer = _tokenizer(a.tokenizer, vocab_size)
    imported = import_flash_stu(a.source, a.format, a.config, a.filters, a.norm_eps)
    if not isinstance(vocab_size, int):  # the import named the bad field already; kept for type checkers
        tokenizer = _tokenizer(a.tokenizer, imported.arch.vocab_size)
    model = build_model(imported)  # on the meta device: keys and shapes checked, nothing allocated
    for line in imported.summary(count_parameters(model)):
        print(line)
    hp = imported.hparams
    print(f"spectralds LanguageModel: layer_pattern {hp['layer_pattern']}, dim {hp['dim']}, "
          f"{hp['num_layers']} layers, mlp_ratio {hp['mlp_ratio']:g} ({hp['mlp_activation']}), "
          f"norm_eps {hp['norm_eps']:.3g}, tied head {hp['tie_embeddings']}, bias {hp['mlp_bias']}, "
          f"layer_kwargs {hp['layer_kwargs']}")
    print(f"tokenizer: {tokenizer}")
    AtomicCheckpointIO().save_checkpoint(to_checkpoint(imported, tokenizer), out)
    print(f"wrote {out}")
