"""Language-modelling data: text -> tokens (cached on disk) -> ``(x, y)`` windows of ``seq_len`` tokens."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from spectralds.errors import MissingFileError, UserError, first_line
from spectralds.io import write_cache

from .corpus import file_signature, local_files, local_pieces, stdlib_files
from .hf import (
    StreamTokens,
    check_local_name,
    hf_pieces,
    hf_signature,
    load_hf_dataset,
    take_leading_documents,
)
from .shards import cache_key, default_cache_dir, encode_pieces, load_shard, token_dtype, write_shard
from .tokenizers import BPETokenizer, Tokenizer, build_tokenizer
from .windows import PackedWindows, TokenWindows, WindowSampler, resumable_loader

# Bump when the shard layout or the text -> pieces rules change, so old caches are not reused.
_FORMAT_VERSION = 1
# Streaming without max_bytes: how much text to hold out for validation and to train a BPE on.
_STREAM_VAL_BYTES = 1_000_000
_STREAM_BPE_BYTES = 20_000_000


class TextDataModule(L.LightningDataModule):
    """Token windows for next-token prediction: batches ``(x, y)`` of int64 ``(batch_size, seq_len)``.

    ``source``:
      * ``"stdlib"``: the ``.py`` files of the running Python's standard library (sorted), available
        everywhere without a download;
      * a path to a text file or a folder (its text-like files, sorted);
      * ``"hf:<name>"``: a Hugging Face dataset: a hub name, a builder with local ``hf_data_files``
        (``"hf:json"`` + ``hf_data_files="docs/*.jsonl"``), or a folder written by ``save_to_disk``.

    ``tokenizer``: ``"byte"``, ``"bpe"`` (byte-level BPE of ``bpe_vocab_size`` tokens trained on the
    corpus), a ``tokenizer.json`` or a ``.tiktoken`` file. :attr:`vocab_size` is known right after
    construction; for ``"bpe"`` it is the requested ``bpe_vocab_size`` (an upper bound: a small corpus
    may yield fewer tokens), and the tokenizer is trained on first use and cached in ``cache_dir``.

    The text (at most ``max_bytes`` bytes of UTF-8; None = all) is tokenized once into a flat token file
    in ``cache_dir`` (default ``$SPECTRALDS_CACHE_DIR/data``), keyed by the source files' names, sizes
    and mtimes, the tokenizer and ``max_bytes``. The last ``val_fraction`` of the token stream is the
    validation split. Training windows are non-overlapping, on a grid shifted and shuffled anew each
    epoch from ``seed`` (see :class:`WindowSampler`); validation windows are fixed.

    ``streaming=True`` (``hf:`` only) tokenizes on the fly instead: the first documents (``val_fraction``
    of ``max_bytes``, or 1 MB) are held out for validation, the rest is split across DDP ranks with
    ``datasets.distributed.split_dataset_by_node`` and packed into windows (shuffled in a small buffer).
    The training stream then repeats endlessly (``max_bytes`` caps each pass), so bound the run with
    ``trainer.max_steps`` and validate with an integer ``val_check_interval``.
    """

    def __init__(
        self,
        source: str = "stdlib",
        tokenizer: str = "byte",
        seq_len: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        max_bytes: int | None = 4_000_000,
        num_workers: int = 0,
        cache_dir: str | None = None,
        seed: int = 0,
        bpe_vocab_size: int = 1024,
        text_field: str = "text",
        hf_split: str = "train",
        hf_config: str | None = None,
        hf_data_files: str | list[str] | None = None,
        streaming: bool = False,
    ):
        super().__init__()
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
        if not 0.0 < val_fraction < 1.0:
            raise UserError(f"val_fraction must be strictly between 0 and 1, got {val_fraction}")
        if max_bytes is not None and max_bytes < 1:
            raise UserError(f"max_bytes must be positive or None, got {max_bytes}")
        if num_workers < 0:
            raise UserError(f"num_workers must be non-negative, got {num_workers}")
        # Not merged into the logger: the CLI logs the whole config, and model and data seq_len may differ.
        self.save_hyperparameters(logger=False)
        self.source, self.seq_len, self.batch_size = source, seq_len, batch_size
        self.val_fraction, self.max_bytes, self.seed = val_fraction, max_bytes, seed
        self.num_workers, self.bpe_vocab_size = num_workers, bpe_vocab_size
        self.text_field, self.hf_split, self.hf_config = text_field, hf_split, hf_config
        self.hf_data_files, self.streaming = hf_data_files, streaming
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()

        self._hf_name: str | None = None
        self._files: list[Path] | None = None
        self._corpus_signature: list | None = None
        if source.startswith("hf:"):
            self._hf_name = source[3:].strip()
            if not self._hf_name:
                raise UserError("source 'hf:' names no dataset; use e.g. 'hf:roneneldan/TinyStories'")
            check_local_name(self._hf_name)
        elif streaming:
            raise UserError(f"streaming applies to 'hf:' sources only, not to {source!r}")
        elif source == "stdlib":
            self._files = stdlib_files()
            if not self._files:
                raise UserError("found no standard-library .py files to use as the 'stdlib' source")
        elif not source.strip():
            raise UserError("source is empty; use 'stdlib', a path to text, or 'hf:<dataset>'")
        else:
            self._files = local_files(source)

        self.tokenizer_spec = tokenizer
        if tokenizer == "bpe":
            if bpe_vocab_size < 256:
                raise UserError(f"bpe_vocab_size must be at least 256 (all bytes), got {bpe_vocab_size}")
            self._tokenizer: Tokenizer | None = None
            self._vocab_size = bpe_vocab_size
        else:
            self._tokenizer = build_tokenizer(tokenizer)
            self._vocab_size = self._tokenizer.vocab_size

        self.train_dataset: TokenWindows | PackedWindows | None = None
        self.val_dataset: TokenWindows | None = None
        self.num_train_tokens = self.num_val_tokens = 0

    # ----------------------------------------------------------------- tokenizer
    @property
    def vocab_size(self) -> int:
        """An upper bound on every token id (exact except for a trained "bpe", see the class doc)."""
        return self._vocab_size

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer; a "bpe" one is trained on the corpus on first access (then read from the cache)."""
        if self._tokenizer is None:
            vocab = self.bpe_vocab_size
            key = cache_key(_FORMAT_VERSION, self._signature(), self.max_bytes, vocab)
            path = self.cache_dir / f"bpe-{key}.json"
            tokenizer = None
            if path.is_file():
                try:
                    tokenizer = BPETokenizer.from_file(path)
                except UserError as err:  # a cache: retrain rather than fail
                    warnings.warn(f"{first_line(err)}; retraining the tokenizer", stacklevel=2)
            if tokenizer is None:
                budget = _STREAM_BPE_BYTES if self.streaming and self.max_bytes is None else self.max_bytes
                tokenizer = BPETokenizer.train(self._pieces(budget), vocab)
                write_cache(path, tokenizer.backend.to_str().encode("utf-8"))  # optional: warns if it fails
            tokenizer.name = f"bpe-{vocab}"
            self._tokenizer = tokenizer
        return self._tokenizer

    # ----------------------------------------------------------------- corpus
    def _signature(self) -> list:
        """What the corpus is made of (names, sizes, mtimes); computed once per instance."""
        if self._corpus_signature is None:
            if self._hf_name is not None:
                signature = hf_signature(self._hf_name, self.hf_split, self.hf_config, self.hf_data_files)
                self._corpus_signature = [*signature, self.text_field]
            else:
                self._corpus_signature = ["files", file_signature(self._files)]
        return self._corpus_signature

    def _hf_dataset(self):
        return load_hf_dataset(
            self._hf_name, self.hf_split, self.hf_config, self.hf_data_files, streaming=self.streaming
        )

    def _pieces(self, max_bytes: int | None):
        if self._hf_name is not None:
            return hf_pieces(self._hf_dataset(), self.text_field, max_bytes)
        return local_pieces(self._files, max_bytes)

    def _shard_path(self) -> Path:
        key = cache_key(_FORMAT_VERSION, self._signature(), self.max_bytes, self.tokenizer.fingerprint)
        return self.cache_dir / f"tokens-{key}"

    def _ensure_shard(self) -> np.memmap:
        path = self._shard_path()
        tokens = load_shard(path, self.vocab_size)
        if tokens is None:
            pieces, dtype = self._pieces(self.max_bytes), token_dtype(self.vocab_size)
            write_shard(path, pieces, self.tokenizer, dtype, what=f"corpus {self.source!r}")
            tokens = load_shard(path, self.vocab_size)
        return tokens

    # ----------------------------------------------------------------- Lightning hooks
    def prepare_data(self) -> None:
        """Train the tokenizer if needed and tokenize the corpus into the cache (once per node)."""
        self.tokenizer  # noqa: B018 (trains and caches a "bpe" tokenizer)
        if not self.streaming:
            self._ensure_shard()

    def setup(self, stage: str | None = None) -> None:
        if self.val_dataset is not None:
            return
        if self.streaming:
            self._setup_streaming()
            return
        path, tokens = self._shard_path(), self._ensure_shard()
        num_val = int(len(tokens) * self.val_fraction)
        num_train = len(tokens) - num_val
        self._check_split_sizes(num_train, num_val)
        self.num_train_tokens, self.num_val_tokens = num_train, num_val
        self.train_dataset = TokenWindows(_ShardSlice(path, 0, num_train), self.seq_len)
        self.val_dataset = TokenWindows(_ShardSlice(path, num_train, len(tokens)), self.seq_len)

    def _setup_streaming(self) -> None:
        from datasets.distributed import split_dataset_by_node

        dataset = self._hf_dataset()
        val_bytes = math.ceil(self.val_fraction * self.max_bytes) if self.max_bytes else _STREAM_VAL_BYTES
        val_pieces, num_val_docs = take_leading_documents(dataset, self.text_field, val_bytes)
        val_tokens = np.fromiter(
            (i for ids in encode_pieces(val_pieces, self.tokenizer) for i in ids), dtype=np.int64
        )
        self._check_split_sizes(None, len(val_tokens))
        self.num_val_tokens = len(val_tokens)
        self.val_dataset = TokenWindows(_Fixed(val_tokens), self.seq_len)

        rank, world_size = self._rank_and_world_size()
        train = split_dataset_by_node(dataset.skip(num_val_docs), rank=rank, world_size=world_size)
        budget = None if self.max_bytes is None else max(1, (self.max_bytes - val_bytes) // world_size)
        # The stream repeats so that DDP ranks, whose shards differ in length, never run dry at
        # different steps (which would leave one rank waiting in a collective forever).
        stream = StreamTokens(train, self.text_field, self.tokenizer, budget)
        self.train_dataset = PackedWindows(stream, self.seq_len, seed=self.seed + rank, repeat=True)

    def _rank_and_world_size(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _check_split_sizes(self, num_train: int | None, num_val: int) -> None:
        need = self.seq_len + 1
        for split, count in (("training", num_train), ("validation", num_val)):
            if count is not None and count < need:
                raise UserError(
                    f"the {split} split of {self.source!r} holds {count} tokens, fewer than seq_len + 1 = "
                    f"{need}; use more text (max_bytes), a larger val_fraction or a smaller seq_len"
                )

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        if isinstance(self.train_dataset, PackedWindows):
            return DataLoader(
                self.train_dataset,
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                pin_memory=torch.cuda.is_available(),
            )
        sampler = WindowSampler(self.num_train_tokens, self.seq_len, shuffle=True, seed=self.seed)
        # Lightning sets the epoch only after it has created (and, resuming, restored) the iterator, and
        # its DDP sampler wrapper lists the offsets right then: start at the epoch that comes next.
        sampler.set_epoch(self.trainer.current_epoch if self.trainer is not None else 0)
        return self._loader(self.train_dataset, sampler)

    def val_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._loader(self.val_dataset, WindowSampler(self.num_val_tokens, self.seq_len))

    def _loader(self, dataset: TokenWindows, sampler: WindowSampler) -> DataLoader:
        # Resumable: a run resumed from a mid-epoch checkpoint goes on where it stopped, not at batch 0.
        return resumable_loader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _require_setup(self) -> None:
        if self.val_dataset is None:
            raise RuntimeError("call setup() before asking TextDataModule for a dataloader")


class _ShardSlice:
    """Opens a token shard and slices it; picklable, so each worker process maps the file itself."""

    def __init__(self, path: Path, start: int, stop: int):
        self.path, self.start, self.stop = path, start, stop

    def __call__(self) -> np.ndarray:
        tokens = load_shard(self.path)
        if tokens is None:
            raise MissingFileError(f"token shard {self.path} is missing or incomplete")
        return tokens[self.start : self.stop]


class _Fixed:
    """A picklable callable returning a fixed array."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __call__(self) -> np.ndarray:
        return self.array
