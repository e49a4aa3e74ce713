"""Hugging Face ``datasets`` as a text source: by hub name, builder + local data files, or a saved folder."""

from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import Path

from torch.utils.data import get_worker_info

from spectralds.errors import MissingFileError, UserError

from .corpus import DOC_SEPARATOR, cap_bytes, documents_to_pieces, file_signature
from .tokenizers import Tokenizer


def load_hf_dataset(
    name: str,
    split: str = "train",
    config: str | None = None,
    data_files: str | list[str] | None = None,
    streaming: bool = False,
):
    """One split of a dataset: a folder written by ``save_to_disk`` or anything ``load_dataset`` takes.

    Local files go through a builder and ``data_files``, e.g. ``name="json", data_files="docs/*.jsonl"``.
    """
    import datasets

    check_local_name(name)
    path = Path(name).expanduser()
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise UserError(f"split {split!r} not in {path} (it has {sorted(dataset)})")
            dataset = dataset[split]
        return dataset.to_iterable_dataset() if streaming else dataset
    return datasets.load_dataset(name, config, split=split, data_files=data_files, streaming=streaming)


def check_local_name(name: str) -> None:
    """Raise FileNotFoundError if ``name`` is written as a local path ("/", ".", "~") that does not exist."""
    if name.startswith(("/", ".", "~")) and not Path(name).expanduser().exists():
        raise MissingFileError(f"dataset folder not found: {Path(name).expanduser()}")


def hf_signature(name: str, split: str, config: str | None, data_files: str | list[str] | None) -> list:
    """What identifies the dataset's contents for the token cache: its arguments, plus the size and
    modification time of local files (a hub dataset is taken as fixed: clear the cache to refresh it)."""
    local = []
    patterns = [data_files] if isinstance(data_files, str) else list(data_files or [])
    for pattern in patterns:
        local += [Path(p) for p in sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))]
    path = Path(name).expanduser()
    if path.is_dir():
        local += sorted(p for p in path.rglob("*") if p.is_file())
    elif path.is_file():
        local.append(path)
    return ["hf", name, split, config, data_files, file_signature(local)]


def hf_texts(dataset, text_field: str) -> Iterator[str]:
    """The ``text_field`` strings of a map-style or iterable dataset, in order (non-strings skipped)."""
    import datasets

    columns = getattr(dataset, "column_names", None)
    if columns is not None and text_field not in columns:
        raise UserError(f"text_field {text_field!r} is not a column of the dataset (columns: {columns})")
    if isinstance(dataset, datasets.Dataset):  # map-style: read in batches, much faster than per row
        for batch in dataset.iter(batch_size=1000):
            yield from (text for text in batch[text_field] if isinstance(text, str))
        return
    for record in dataset:
        if text_field not in record:
            raise UserError(f"text_field {text_field!r} is not a field of the records ({list(record)})")
        if isinstance(record[text_field], str):
            yield record[text_field]


def hf_pieces(dataset, text_field: str, max_bytes: int | None) -> Iterator[str]:
    """The dataset's text, one document per record, capped at ``max_bytes`` bytes of UTF-8."""
    return cap_bytes(documents_to_pieces([text] for text in hf_texts(dataset, text_field)), max_bytes)


def take_leading_documents(dataset, text_field: str, num_bytes: int) -> tuple[list[str], int]:
    """The first records' pieces, about ``num_bytes`` bytes of them, and how many records they used.

    Raises ValueError if that leaves no record over (the rest of the stream would be empty).
    """
    pieces, used, count = [], 0, 0
    for text in hf_texts(dataset, text_field):
        if used >= num_bytes:
            return pieces, count
        pieces += [text, DOC_SEPARATOR] if text else []
        used += len(text.encode("utf-8"))
        count += 1
    raise UserError(
        f"holding out {num_bytes} bytes for validation used all {count} records of the stream; "
        "set max_bytes (validation takes val_fraction of it) or stream a larger dataset"
    )


class StreamTokens:
    """Token ids of a streaming dataset, one list per record, as a callable for ``PackedWindows``.

    Called inside each DataLoader worker: ``datasets`` then hands each worker its own shards (workers
    beyond the number of shards get none), so the byte budget is divided among the workers that read
    (it was divided among ranks by the caller).
    """

    def __init__(self, dataset, text_field: str, tokenizer: Tokenizer, max_bytes: int | None):
        self.dataset, self.text_field = dataset, text_field
        self.tokenizer, self.max_bytes = tokenizer, max_bytes

    def __call__(self) -> Iterator[list[int]]:
        worker = get_worker_info()
        budget = self.max_bytes
        if budget is not None and worker is not None:
            budget //= max(1, min(worker.num_workers, getattr(self.dataset, "num_shards", 1)))
        for piece in hf_pieces(self.dataset, self.text_field, budget):
            yield self.tokenizer.encode(piece)
