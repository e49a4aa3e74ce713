"""Files: the cache directory, crash-safe writes, content hashes.

Every file spectralds writes goes through `atomic_write`: a temporary file in the target's directory,
fsynced, renamed over the target, the directory fsynced, so a crash leaves the old file or the new one,
never half of one. It refuses to replace anything but a regular file (a device, a FIFO, a directory),
and the new file gets the permissions of a plain `open()` (0666 less the umask).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

import torch

from spectralds.errors import FileWriteError, MissingFileError, UserError, first_line


def cache_dir() -> Path:
    """Where filters, LDS fits and token shards are cached: $SPECTRALDS_CACHE_DIR, else
    $XDG_CACHE_HOME/spectralds (where a user keeps every tool's cache), else ~/.cache/spectralds."""
    if os.environ.get("SPECTRALDS_CACHE_DIR"):
        return Path(os.environ["SPECTRALDS_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spectralds"


def check_output_path(path: str | os.PathLike, make_parents: bool = False) -> Path:
    """Validate a file we are about to write, before any work: one UserError naming the problem."""
    if str(path) == "":
        raise UserError("the output path is empty")
    path = Path(path)
    if path.exists() and not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file"
        raise UserError(f"refusing to write {path}: it exists and is {kind}")
    parent = path.parent
    if not parent.is_dir():
        ancestor = next(p for p in parent.parents if p.exists()) if not parent.exists() else parent
        if not ancestor.is_dir():
            raise UserError(f"cannot write {path}: {ancestor} is not a directory")
        if not make_parents:
            raise UserError(f"cannot write {path}: directory {parent} does not exist")
        try:  # now, so a folder that cannot be made is refused before the work, not after it
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot write {path}: cannot create directory {parent} ({e.strerror})") from e
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write {path}: directory {parent} is not writable")
    return path


def input_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as a file to read, checked before it is opened: a directory, or a path that is not a regular
    file (/dev/zero, a FIFO: a reader would run forever or block), is a one-line UserError naming `what`,
    a missing one a MissingFileError."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory")
    if not path.is_file():
        if path.exists():
            raise UserError(f"{what} {path} is not a regular file")
        raise MissingFileError(f"{what} {path} does not exist")
    return path


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: links and other spellings included (resolved paths when one
    does not exist yet, or cannot be inspected)."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not supported everywhere
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[IO[bytes]], None]) -> Path:
    """Write `data` (bytes, or a function writing to a binary file) to `path` atomically.

    Raises UserError for a target that is not a regular file or a missing/unwritable directory, and
    FileWriteError (a UserError and an OSError, naming the path) when the write itself fails (a full disk).
    """
    path = check_output_path(path, make_parents=True)
    # Hidden and not *.ckpt/*.safetensors: a leftover after a hard kill is never taken for a result.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            data(f) if callable(data) else f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as err:
        raise FileWriteError(f"could not write {path}: {err.strerror or first_line(err)}") from err
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


_warned_caches: set[str] = set()


def write_cache(path: str | os.PathLike, data: bytes | Callable[[IO[bytes]], None]) -> bool:
    """`atomic_write` for an optional cache: a failure (read-only, full disk) warns once per directory
    and returns False; the caller goes on with what it computed."""
    try:
        atomic_write(path, data)
        return True
    except (OSError, UserError) as err:
        directory = str(Path(path).parent)
        if directory not in _warned_caches:
            _warned_caches.add(directory)
            warnings.warn(f"cache {directory} cannot be written ({first_line(err)}); going on without "
                          "caching", stacklevel=3)
        return False


def tensor_hash(tensors: Mapping[str, torch.Tensor], **fields: object) -> str:
    """sha256 over the tensors (names, dtypes, shapes, bytes) and `fields`: a file's content hash."""
    digest = hashlib.sha256()
    for key in sorted(fields):
        digest.update(f"{key}={fields[key]!r};".encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        # Flattened first: a "contiguous" (L, 1) tensor may still have stride 2 in its size-1 dim.
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
