"""Loading checkpoints safely (no unpickling of arbitrary objects) with one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule

from spectralds.errors import MissingFileError, UserError
from spectralds.models import LanguageModel, SequenceRegression

MODEL_CLASSES: dict[str, type[LightningModule]] = {
    "LanguageModel": LanguageModel,
    "SequenceRegression": SequenceRegression,
}


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load with weights_only=True: tensors and plain Python values only."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or holding objects we refuse to unpickle
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} could not be read ({first_line})") from e
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"checkpoint {path} is not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


def load_model(
    path: str | Path, model_class: str | None = None, checkpoint: dict[str, Any] | None = None
) -> LightningModule:
    """Rebuild the model a checkpoint was saved from (swapped/pruned layers included) and load it."""
    checkpoint = checkpoint if checkpoint is not None else read_checkpoint(path)
    name = model_class or checkpoint.get("spectralds_model", "LanguageModel")
    if name not in MODEL_CLASSES:
        raise UserError(f"checkpoint {path} holds an unknown model class {name!r}")
    # LightningCLI adds private keys such as "_class_path"; they are not constructor arguments.
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
    try:
        model = MODEL_CLASSES[name](**hparams)
        model.on_load_checkpoint(checkpoint)
        model.load_state_dict(checkpoint["state_dict"], strict=True)
    except (RuntimeError, TypeError, ValueError, KeyError) as e:
        first_line = str(e).strip().splitlines()[0]
        raise UserError(f"checkpoint {path} does not match a {name} architecture: {first_line}") from e
    return model.eval()


def tokenizer_spec(checkpoint: dict[str, Any]) -> str:
    """The tokenizer the checkpoint's data module used ("byte" when it does not say)."""
    return checkpoint.get("datamodule_hyper_parameters", {}).get("tokenizer", "byte")
