"""Token shards: a corpus tokenized once into a flat array on disk, read back as a memmap.

A shard is two files, ``<key>.bin`` (raw little-endian uint16/uint32 ids) and ``<key>.json``
(dtype, length). Both are written under temporary names and renamed into place, the JSON last, so a
shard whose JSON exists is complete, and processes building the same shard at once do no harm.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from spectralds.errors import UserError

from .tokenizers import Tokenizer

# Pieces are handed to the tokenizer in groups of this many characters (parallel batch encoding).
_BATCH_CHARS = 4 << 20


def default_cache_dir() -> Path:
    """``$SPECTRALDS_CACHE_DIR/data``, else ``~/.cache/spectralds/data``."""
    return Path(os.environ.get("SPECTRALDS_CACHE_DIR", Path.home() / ".cache" / "spectralds")) / "data"


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

    Raises ValueError and writes nothing if the text holds no tokens.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp_bin = path.with_name(f".{path.name}.bin.{tag}")
    num_tokens = 0
    try:
        with open(tmp_bin, "wb") as f:
            for ids in encode_pieces(pieces, tokenizer):
                array = np.asarray(ids, dtype=np.int64)
                if array.size and (array.min() < 0 or array.max() >= np.iinfo(dtype).max + 1):
                    raise UserError(f"tokenizer {tokenizer.name} produced an id outside {dtype}")
                f.write(array.astype(dtype.newbyteorder("<")).tobytes())
                num_tokens += array.size
        if num_tokens == 0:
            raise UserError(f"the {what} is empty: it holds no text to tokenize")
        os.replace(tmp_bin, path.with_suffix(".bin"))
    finally:
        tmp_bin.unlink(missing_ok=True)
    meta = {"dtype": dtype.name, "num_tokens": num_tokens, "tokenizer": tokenizer.name}
    tmp_json = path.with_name(f".{path.name}.json.{tag}")
    tmp_json.write_text(json.dumps(meta), encoding="utf-8")
    os.replace(tmp_json, path.with_suffix(".json"))
    return num_tokens


def load_shard(path: Path) -> np.memmap | None:
    """The shard at ``path`` (without suffix) as a read-only memmap, or None if it is not complete."""
    meta_file, bin_file = path.with_suffix(".json"), path.with_suffix(".bin")
    if not meta_file.is_file() or not bin_file.is_file():
        return None
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    if bin_file.stat().st_size != meta["num_tokens"] * dtype.itemsize:
        return None
    return np.memmap(bin_file, dtype=dtype, mode="r", shape=(meta["num_tokens"],))
