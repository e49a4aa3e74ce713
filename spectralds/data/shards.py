"""Token shards: a corpus tokenized once into a flat array on disk, read back as a memmap.

A shard is two files, ``<key>.bin`` (raw little-endian uint16/uint32 ids) and ``<key>.json``
(dtype, length). Both are written with `spectralds.io.atomic_write`, the JSON last, so a shard whose
JSON exists is complete, and processes building the same shard at once do no harm.

A shard is a cache: one whose JSON is unreadable or incomplete, or whose .bin does not have the
length the JSON gives, is rebuilt with a warning naming the file. Token ids are checked against the
vocabulary once at load (one max over the memmap): an id >= vocab size is a one-line error naming the
file, never an out-of-range embedding lookup later.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import IO

import numpy as np

from spectralds.errors import FileWriteError, UserError, first_line
from spectralds.io import atomic_write, cache_dir

from .tokenizers import Tokenizer

# Pieces are handed to the tokenizer in groups of this many characters (parallel batch encoding).
_BATCH_CHARS = 4 << 20


def default_cache_dir() -> Path:
    """``data`` in the cache directory (`spectralds.io.cache_dir`: ~/.cache/spectralds by default)."""
    return cache_dir() / "data"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id below ``vocab_size``."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def cache_key(*parts) -> str:
    """A short stable hash of JSON-serializable parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:20]


def encode_pieces(pieces: Iterable[str], tokenizer: Tokenizer) -> Iterable[list[int]]:
    """Token ids for each group of pieces (groups of about _BATCH_CHARS characters)."""
    batch: list[str] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece)
        if size >= _BATCH_CHARS:
            yield from tokenizer.encode_batch(batch)
            batch, size = [], 0
    if batch:
        yield from tokenizer.encode_batch(batch)


def write_shard(
    path: Path, pieces: Iterable[str], tokenizer: Tokenizer, dtype: np.dtype, what: str = "corpus"
) -> int:
    """Tokenize ``pieces`` into the shard ``path`` (without suffix); returns the number of tokens.

    Raises a UserError and writes nothing if the text holds no tokens, and a FileWriteError naming the
    file when it cannot be written (the shard is needed: training reads it).
    """
    num_tokens = 0

    def tokenize_into(f: IO[bytes]) -> None:  # streamed: the corpus never sits in memory at once
        nonlocal num_tokens
        for ids in encode_pieces(pieces, tokenizer):
            array = np.asarray(ids, dtype=np.int64)
            if array.size and (array.min() < 0 or array.max() >= np.iinfo(dtype).max + 1):
                raise UserError(f"tokenizer {tokenizer.name} produced an id outside {dtype}")
            f.write(array.astype(dtype.newbyteorder("<")).tobytes())
            num_tokens += array.size
        if num_tokens == 0:
            raise UserError(f"the {what} is empty: it holds no text to tokenize")

    meta = {"dtype": dtype.name, "tokenizer": tokenizer.name}
    try:
        atomic_write(path.with_suffix(".bin"), tokenize_into)
        meta["num_tokens"] = num_tokens
        atomic_write(path.with_suffix(".json"), json.dumps(meta).encode("utf-8"))
    except FileWriteError:
        raise
    except OSError as err:
        hint = "set SPECTRALDS_CACHE_DIR or the data module's cache_dir to a writable folder"
        raise FileWriteError(f"cannot write the token shard {path} ({first_line(err)}); {hint}") from None
    return num_tokens


def _stale(meta_file: Path, problem: str) -> None:
    warnings.warn(f"token shard {meta_file}: {problem}; rebuilding it", stacklevel=3)


def load_shard(path: Path, vocab_size: int | None = None) -> np.memmap | None:
    """The shard at ``path`` (without suffix) as a read-only memmap, or None if it is missing or must be
    rebuilt (a warning names the file). With ``vocab_size``, an id >= vocab_size is a UserError."""
    meta_file, bin_file = path.with_suffix(".json"), path.with_suffix(".bin")
    if not meta_file.is_file() or not bin_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        num_tokens = meta["num_tokens"]
        count_ok = isinstance(num_tokens, int) and not isinstance(num_tokens, bool) and num_tokens >= 1
        if dtype.kind != "u" or not count_ok:
            raise ValueError(f"dtype {meta['dtype']!r}, num_tokens {num_tokens!r}")
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as err:  # garbage, missing keys
        _stale(meta_file, f"unreadable metadata ({type(err).__name__}: {first_line(err)})")
        return None
    if bin_file.stat().st_size != num_tokens * dtype.itemsize:
        _stale(meta_file, f"{bin_file.name} holds {bin_file.stat().st_size} bytes, not {num_tokens} tokens")
        return None
    tokens = np.memmap(bin_file, dtype=dtype, mode="r", shape=(num_tokens,))
    if vocab_size is not None:
        top = int(tokens.max())  # one pass over the file, once per load
        if top >= vocab_size:
            raise UserError(f"token shard {bin_file} holds token id {top} >= the vocabulary size "
                            f"{vocab_size}; delete it to rebuild it")
    return tokens
