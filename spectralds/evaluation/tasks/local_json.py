"""Loads a task's JSONL files relative to this folder (datasets resolves bare relative paths against the
working directory, so `dataset_kwargs: {data_files: ...}` alone works only when run from here)."""

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load(data_files: dict[str, str], **_metadata) -> datasets.DatasetDict:
    files = {split: str(HERE / name) for split, name in data_files.items()}
    return datasets.load_dataset("json", data_files=files)
