"""`spectralds export`: a checkpoint in another format (a transformers directory, or Flash STU 2's)."""

from __future__ import annotations

from spectralds.cli_errors import CommandParser
from spectralds.errors import UserError, first_line

FORMATS = ("hf", "flash-stu-2")


def export_main(argv: list[str]) -> None:
    p = CommandParser("spectralds export", "Write a checkpoint's model in another format.")
    p.add_argument("--ckpt", required=True, help="a checkpoint written by `spectralds fit`")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="hf: a transformers directory (AutoModelForCausalLM); flash-stu-2: the reference's")
    p.add_argument("--out", required=True, help="the directory to write (must not exist, or be empty)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer for hf (None: the one the model trained with)")
    a = p.parse_args(argv)
    if a.format == "hf":  # before the checkpoint is read: the one-line install hint comes first
        from spectralds.interop.hf_require import require_transformers

        require_transformers()
    from spectralds.checkpoint_io import load_model, read_checkpoint, tokenizer_spec

    checkpoint = read_checkpoint(a.ckpt)
    model, spec = load_model(a.ckpt, checkpoint=checkpoint), tokenizer_spec(checkpoint)
    stored = checkpoint["state_dict"].get("embed.weight")
    if stored is not None and stored.dtype != model.embed.weight.dtype:
        # load_model builds in float32: a float64 (or bf16) checkpoint is exported in its own dtype, the
        # weights loaded again after the cast so no value goes through float32.
        model.to(stored.dtype).load_state_dict(checkpoint["state_dict"], strict=True)
    if a.format == "flash-stu-2":
        try:
            from spectralds.interop.flash_stu import export_flash_stu2
        except ImportError as err:
            raise UserError(f"the flash-stu-2 format is not available here ({first_line(err)})") from err
        export_flash_stu2(model, a.out)
        print(f"wrote {a.out}")
        return
    from spectralds.data import build_tokenizer
    from spectralds.interop.hf_export import export_hf

    spec = a.tokenizer or spec
    if spec == "bpe":
        raise UserError("this model used a BPE tokenizer trained on its corpus: pass --tokenizer "
                        "tokenizer.json")
    out = export_hf(model, a.out, build_tokenizer(spec))
    print(f"wrote {out} (AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True))")
