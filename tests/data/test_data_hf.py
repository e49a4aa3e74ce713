"""TextDataModule over Hugging Face datasets built from local files only (offline)."""

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import itertools  # noqa: E402
import json  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from spectralds.data import TextDataModule  # noqa: E402
from spectralds.data.corpus import DOC_SEPARATOR  # noqa: E402

datasets = pytest.importorskip("datasets")

DOCS = [f"Document {i}: " + " ".join(f"word{(i * 7 + k) % 13}" for k in range(5 + i % 9)) for i in range(40)]


@pytest.fixture(autouse=True)
def offline_hf(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    datasets.disable_progress_bars()


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    with open(path, "w") as f:
        for i, text in enumerate(DOCS):
            f.write(json.dumps({"text": text, "id": i}) + "\n")
    return path


def stream_of(docs) -> str:
    return "".join(doc + DOC_SEPARATOR for doc in docs)


def make_dm(tmp_path, **kw) -> TextDataModule:
    args = dict(seq_len=16, batch_size=4, val_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    dm = TextDataModule(**{**args, **kw})
    dm.prepare_data()
    dm.setup("fit")
    return dm


def all_tokens(dm) -> np.ndarray:
    return np.concatenate([dm.train_dataset.tokens, dm.val_dataset.tokens])


def test_hf_json_data_files_map_style(tmp_path, jsonl):
    dm = make_dm(tmp_path, source="hf:json", hf_data_files=str(jsonl))
    text = stream_of(DOCS)
    assert dm.tokenizer.decode(all_tokens(dm).tolist()) == text
    assert dm.num_val_tokens == int(len(text) * 0.1)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])


def test_hf_saved_folder_matches_json_route(tmp_path, jsonl):
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": DOCS, "id": list(range(len(DOCS)))}).save_to_disk(str(folder))
    from_disk = make_dm(tmp_path, source=f"hf:{folder}")
    from_json = make_dm(tmp_path, source="hf:json", hf_data_files=str(jsonl))
    np.testing.assert_array_equal(all_tokens(from_disk), all_tokens(from_json))


def test_hf_missing_local_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        TextDataModule(source=f"hf:{tmp_path / 'nowhere'}")


def test_hf_text_field_errors(tmp_path, jsonl):
    with pytest.raises(ValueError, match="text_field 'body'"):
        make_dm(tmp_path, source="hf:json", hf_data_files=str(jsonl), text_field="body")
    with pytest.raises(ValueError, match="text_field 'body'"):
        make_dm(tmp_path, source="hf:json", hf_data_files=str(jsonl), text_field="body", streaming=True)


def streaming_dm(tmp_path, jsonl, rank=None, **kw) -> TextDataModule:
    args = dict(source="hf:json", hf_data_files=str(jsonl), streaming=True, seq_len=16, batch_size=4)
    args.update(val_fraction=0.1, max_bytes=2_000, cache_dir=str(tmp_path / "cache"))
    dm = TextDataModule(**{**args, **kw})
    if rank is not None:
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)  # what setup reads under DDP
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_hf_streaming_holds_out_leading_documents_and_packs_the_rest(tmp_path, jsonl):
    dm = streaming_dm(tmp_path, jsonl)
    # Validation: the first records, about val_fraction * max_bytes = 200 bytes of them.
    num_val_docs = next(n for n in range(len(DOCS) + 1) if sum(map(len, DOCS[:n])) >= 200)
    val_text = stream_of(DOCS[:num_val_docs])
    assert dm.tokenizer.decode(dm.val_dataset.tokens.tolist()) == val_text
    assert len(list(dm.val_dataloader())) == -(-((len(val_text) - 1) // 16) // 4)

    train_text = stream_of(DOCS[num_val_docs:]).encode()
    train_text = train_text[: 2_000 - 200]  # the byte budget left after validation
    expected = sorted(train_text[k : k + 17] for k in range(0, len(train_text) - 16, 16))
    # The stream repeats endlessly: two passes, each holding every packed window once, in new orders.
    pairs = list(itertools.islice(iter(dm.train_dataset), 2 * len(expected)))
    windows = [bytes(x.tolist()) + bytes([y[-1]]) for x, y in pairs]
    assert all(torch.equal(x[1:], y[:-1]) for x, y in pairs)
    assert sorted(windows[: len(expected)]) == sorted(windows[len(expected) :]) == expected
    assert windows[: len(expected)] != windows[len(expected) :]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64


def test_hf_streaming_split_by_node_gives_disjoint_shards(tmp_path, jsonl):
    whole = streaming_dm(tmp_path, jsonl)
    per_rank = [streaming_dm(tmp_path, jsonl, rank=rank) for rank in range(2)]
    texts = [list(dm.train_dataset.token_lists.dataset) for dm in (whole, *per_rank)]
    ids = [{record["id"] for record in records} for records in texts]
    assert ids[1] and ids[2] and not ids[1] & ids[2]
    assert ids[1] | ids[2] == ids[0] and min(ids[0]) > 0  # the validation records are left out
    # Both ranks hold out the same validation records and budget half of the training bytes each.
    assert np.array_equal(per_rank[0].val_dataset.tokens, per_rank[1].val_dataset.tokens)
    assert per_rank[0].train_dataset.token_lists.max_bytes == (2_000 - 200) // 2
    for dm in per_rank:
        assert next(iter(dm.train_dataloader()))[0].shape == (4, 16)


def test_hf_streaming_errors_when_validation_takes_everything(tmp_path, jsonl):
    with pytest.raises(ValueError, match="used all 40 records"):
        streaming_dm(tmp_path, jsonl, max_bytes=None)
