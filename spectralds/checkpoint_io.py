"""Crash-safe checkpoint files: atomic writes, no NaN checkpoints, safe loading.

`spectralds fit` uses :class:`AtomicCheckpointIO` by default. With plain Lightning::

    Trainer(plugins=[AtomicCheckpointIO()])
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _load as pl_load
from lightning.pytorch.plugins.io import TorchCheckpointIO

from spectralds.errors import MissingFileError, NonFiniteError, UserError


def first_nonfinite(state_dict: Mapping[str, Any]) -> str | None:
    """The key of the first floating (or complex) tensor holding NaN or Inf, else None."""
    for key, value in state_dict.items():
        if (
            isinstance(value, torch.Tensor)
            and (value.is_floating_point() or value.is_complex())
            and not bool(torch.isfinite(value).all())
        ):
            return key
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints that a crash or a diverged run cannot spoil.

    * A save writes a temporary file next to the target, flushes and fsyncs it, then ``os.replace``-s it
      onto the target, so a crash mid-save leaves the previous file (e.g. ``last.ckpt``) whole. A hard kill
      may leave a hidden ``.<name>.<id>.tmp`` file behind, never a truncated checkpoint.
    * A save whose ``state_dict`` holds NaN/Inf raises ``FloatingPointError`` naming the tensor, so a
      diverged run never replaces a good checkpoint.
    * A load uses ``torch.load(weights_only=True)`` (no unpickling of arbitrary objects) unless the caller
      passes ``weights_only=False``; failures are one-line errors naming the file.

    Remote paths (``s3://`` and the like) are written by Lightning's own fsspec transaction.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        bad = first_nonfinite(checkpoint.get("state_dict", {}))
        if bad is not None:
            raise NonFiniteError(f"refusing to save checkpoint {path}: tensor {bad!r} holds NaN or Inf")
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Same directory, so the rename is atomic; not *.ckpt, so a leftover is never taken for a checkpoint.
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "xb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)  # makes the rename itself survive a power loss

    def load_checkpoint(
        self,
        path: str | os.PathLike,
        map_location: Any = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if "://" not in str(path) and not Path(path).is_file():
            raise MissingFileError(f"checkpoint {path} does not exist")
        try:
            return pl_load(path, map_location=map_location, weights_only=weights_only is not False)
        except Exception as e:  # truncated, corrupt, or holding objects we refuse to unpickle
            raise UserError(f"checkpoint {path} could not be read ({_first_line(e)})") from e


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not supported everywhere (e.g. Windows)
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
