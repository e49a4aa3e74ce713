"""`fit --ckpt_path`: the config's model must be the checkpoint's.

LightningCLI puts a checkpoint's hyperparameters over the config's model arguments without a word (and
config.yaml then records the checkpoint's), so a run resumed after an edit of `dim` or `layer_pattern`
would train the old model while the config says otherwise. Each difference is refused in one line
before anything is written. The optimizer and schedule are not hyperparameters of our models: changing
them on resume is honoured.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spectralds.errors import UserError


def check_resumed_model(model_config: Any, checkpoint: Mapping[str, Any], ckpt_path: str) -> None:
    """A UserError naming the first model argument whose config value differs from the checkpoint's."""
    hparams = checkpoint.get("hyper_parameters") or {}
    config = model_config.as_dict() if hasattr(model_config, "as_dict") else dict(model_config or {})
    saved_class = hparams.get("_class_path")
    if saved_class and config.get("class_path") and config["class_path"] != saved_class:
        raise UserError(f"--ckpt_path {ckpt_path} holds a {saved_class}, the config's model is a "
                        f"{config['class_path']}: resume with the config that trained it")
    init_args = config.get("init_args") or {}
    for key, saved in hparams.items():
        if key.startswith("_") or key not in init_args or init_args[key] == saved:
            continue
        raise UserError(
            f"--ckpt_path {ckpt_path}: model {key} is {init_args[key]!r} in the config but {saved!r} in the "
            f"checkpoint, whose value a resumed run would silently keep: set {key} back to {saved!r}, or "
            "start a new run without --ckpt_path"
        )
