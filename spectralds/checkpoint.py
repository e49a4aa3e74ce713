"""Old import path: everything lives in `spectralds.checkpoint_io` (one checkpoint module)."""

from spectralds.checkpoint_io import load_model, read_checkpoint, tokenizer_spec

__all__ = ["load_model", "read_checkpoint", "tokenizer_spec"]
