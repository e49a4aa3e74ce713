"""`spectralds export`: a checkpoint in another format (a transformers directory, or Flash STU 2's)."""

from __future__ import annotations

from typing import Literal

from spectralds.errors import UserError, first_line

FORMATS = ("hf", "flash-stu-2")


def export(*, ckpt: str, format: Literal[FORMATS], out: str, tokenizer: str | None = None) -> None:
    """Write a checkpoint's model in another format.

    Args:
        ckpt: a checkpoint written by `spectralds fit`
        format: hf: a transformers directory (AutoModelForCausalLM); flash-stu-2: the reference's
        out: the directory to write (must not exist, or be empty)
        tokenizer: tokenizer for hf (None: the one the model trained with)
    """
    if format == "hf":  # before the checkpoint is read: the one-line install hint comes first
        from spectralds.interop.hf_require import require_transformers

        require_transformers()
    from spectralds.checkpoint_io import load_model, read_checkpoint, tokenizer_spec

    checkpoint = read_checkpoint(ckpt)
    model, spec = load_model(ckpt, checkpoint=checkpoint), tokenizer_spec(checkpoint)
    stored = checkpoint["state_dict"].get("embed.weight")
    if stored is not None and stored.dtype != model.embed.weight.dtype:
        # load_model builds in float32: a float64 (or bf16) checkpoint is exported in its own dtype, the
        # weights loaded again after the cast so no value goes through float32.
        model.to(stored.dtype).load_state_dict(checkpoint["state_dict"], strict=True)
    if format == "flash-stu-2":
        try:
            from spectralds.interop.flash_stu import export_flash_stu2
        except ImportError as err:
            raise UserError(f"the flash-stu-2 format is not available here ({first_line(err)})") from err
        export_flash_stu2(model, out)
        print(f"wrote {out}")
        return
    from spectralds.data import build_tokenizer
    from spectralds.interop.hf_export import export_hf

    spec = tokenizer or spec
    if spec == "bpe":
        raise UserError("this model used a BPE tokenizer trained on its corpus: pass --tokenizer "
                        "tokenizer.json")
    written = export_hf(model, out, build_tokenizer(spec))
    print(f"wrote {written} (AutoModelForCausalLM.from_pretrained({str(written)!r}, trust_remote_code=True))")
