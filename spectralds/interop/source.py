"""A source checkpoint read lazily: its tensors memory-mapped, its config.json parsed.

A source is a `save_pretrained` directory (config.json plus model.safetensors, sharded
model-*.safetensors with their index, or pytorch_model.bin), or one state dict file (.safetensors, or a
torch file read with weights_only=True) whose config is `--config` or the config.json beside it.
Safetensors files are opened with `safe_open` (mmap: a tensor's pages are read when it is used), torch
files with `torch.load(weights_only=True, mmap=True)`; nothing is copied until a mapping needs it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from spectralds.errors import MissingFileError, UserError, first_line

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class Source:
    """Lazily read tensors by key (`keys()`, `get(key)`, `shape(key)`), the parsed config and where they
    came from. Use as a context manager: the safetensors handles are closed on exit."""

    def __init__(self, path: str | os.PathLike, config_path: str | os.PathLike | None = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise MissingFileError(f"source {self.path} does not exist")
        self.files = _weight_files(self.path)
        self.config_path = _config_file(self.path, config_path)
        self.config = _read_config(self.config_path)
        self._stack = ExitStack()
        self._where: dict[str, Any] = {}  # key -> an open safe_open handle or a loaded dict
        try:
            for file in self.files:
                self._open(file)
        except Exception:
            self._stack.close()
            raise

    def _open(self, file: Path) -> None:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                handle = self._stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            except Exception as e:  # safetensors raises its own types for a corrupt header
                raise UserError(f"{file} is not a readable safetensors file ({first_line(e)})") from e
            keys = list(handle.keys())
        else:
            handle = _torch_state_dict(file)
            keys = list(handle)
        for key in keys:
            if key in self._where:
                raise UserError(f"{file}: tensor {key!r} appears in two weight files of the source")
            self._where[key] = handle

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        where = self._where.get(key)
        if where is None:
            raise UserError(f"source {self.path} has no tensor {key!r}")
        return where[key] if isinstance(where, dict) else where.get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        where = self._where[key]
        if isinstance(where, dict):
            return tuple(where[key].shape)
        return tuple(where.get_slice(key).get_shape())

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self._where:
            yield key, self.get(key)


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix != ".safetensors" and path.suffix not in _TORCH_SUFFIXES:
            kinds = ", ".join(_TORCH_SUFFIXES)
            raise UserError(f"source {path}: expected a .safetensors or a torch ({kinds}) state dict, or a "
                            "save_pretrained directory")
        return [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{index} is not a safetensors index (no weight_map: {first_line(e)})") from e
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise MissingFileError(f"{index} names weight files that are not there: {', '.join(missing)}")
        return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return [path / name]
    raise MissingFileError(f"source directory {path} holds no model.safetensors, sharded safetensors index "
                           "or pytorch_model.bin")


def _config_file(path: Path, config_path: str | os.PathLike | None) -> Path:
    if config_path is not None:
        config = Path(config_path)
        if not config.is_file():
            raise MissingFileError(f"config file {config} does not exist")
        return config
    config = (path if path.is_dir() else path.parent) / "config.json"
    if not config.is_file():
        where = "in the source directory" if path.is_dir() else f"beside {path.name}"
        raise MissingFileError(f"no config.json {where} ({config}); pass --config CONFIG.json")
    return config


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"config {path} is not readable JSON ({first_line(e)})") from e
    if not isinstance(config, dict):
        raise UserError(f"config {path} must hold a JSON object, found a {type(config).__name__}")
    return config


def _torch_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """A torch state dict, weights_only (data, never code) and memory-mapped (zip format)."""
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # corrupt, legacy (non-zip) or holding objects weights_only refuses
        raise UserError(f"{file} could not be read as a torch state dict ({first_line(e)})") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # a training checkpoint wrapping the weights
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise UserError(f"{file} does not hold a state dict (a dict of tensors by name)")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"{file} holds no tensors")
    return tensors
