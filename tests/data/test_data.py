"""Tokenizers and TextDataModule on tiny local corpora (never the network)."""

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import base64  # noqa: E402
import pickle  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper  # noqa: E402

import spectralds.data.text as text_module  # noqa: E402
from spectralds.data import (  # noqa: E402
    BPETokenizer,
    ByteTokenizer,
    TextDataModule,
    TiktokenTokenizer,
    build_tokenizer,
)
from spectralds.data.corpus import local_files, local_pieces  # noqa: E402
from spectralds.data.tokenizers import TIKTOKEN_PATTERNS, tiktoken_pattern_for  # noqa: E402
from spectralds.data.windows import PackedWindows, WindowSampler  # noqa: E402

CORPUS = Path(__file__).parents[1] / "assets" / "data" / "corpus"
CORPUS_FILES = sorted(str(p) for p in CORPUS.rglob("*.txt"))


def corpus_text(files=None, max_bytes=None) -> str:
    return "".join(local_pieces(files or local_files(CORPUS), max_bytes))


def make_dm(tmp_path, **kw) -> TextDataModule:
    args = dict(source=str(CORPUS), seq_len=16, batch_size=4, val_fraction=0.1)
    args["cache_dir"] = str(tmp_path / "cache")
    dm = TextDataModule(**{**args, **kw})
    dm.prepare_data()
    dm.setup("fit")
    return dm


# ------------------------------------------------------------------------------------------ tokenizers
@settings(max_examples=30, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


def test_byte_tokenizer_replaces_invalid_utf8():
    assert ByteTokenizer().decode([104, 0xFF, 105]) == "h\ufffdi"
    assert ByteTokenizer().vocab_size == 256


def test_bpe_train_save_load_round_trip(tmp_path):
    tok = build_tokenizer("bpe", corpus_files=CORPUS_FILES, vocab_size=300)
    assert isinstance(tok, BPETokenizer) and 256 < tok.vocab_size <= 300
    text = Path(CORPUS_FILES[0]).read_text()
    ids = tok.encode(text)
    assert len(ids) < len(text.encode("utf-8")), "merges learned on the corpus must compress it"
    assert max(ids) < tok.vocab_size
    unseen = "naïve café — 東京 🙂\ttabs\n\n  spaces"
    for sample in (text, unseen, ""):
        assert tok.decode(tok.encode(sample)) == sample

    path = tmp_path / "tokenizer.json"
    tok.save(path)
    loaded = build_tokenizer(str(path))
    assert loaded.vocab_size == tok.vocab_size and loaded.fingerprint == tok.fingerprint
    assert loaded.encode(text) == ids and loaded.encode_batch([text, unseen]) == [ids, tok.encode(unseen)]


def test_bpe_rejects_vocab_below_byte_alphabet():
    with pytest.raises(ValueError, match="at least 256"):
        BPETokenizer.train(["abc"], 100)


def write_tiktoken(path: Path, merges: list[bytes]) -> None:
    ranks = [bytes([b]) for b in range(256)] + merges
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))


def test_tiktoken_local_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    path = tmp_path / "tiny.tiktoken"
    write_tiktoken(path, [b"th", b"the", b" the", b"er"])
    tok = build_tokenizer(str(path))
    assert isinstance(tok, TiktokenTokenizer) and tok.vocab_size == 260
    assert tok.encode("the") == [257]
    assert tok.encode("the other the") == [257, ord(" "), ord("o"), 257, ord("r"), 258]
    for sample in ("The weather, and the rivers: 東京 🙂\n", ""):
        assert tok.decode(tok.encode(sample)) == sample
    assert tok.decode([ord("a"), 0xC3]) == "a\ufffd"

    # tiktoken caches by path: a changed file at the same path must not be served from a stale copy.
    write_tiktoken(path, [b"th"])
    changed = TiktokenTokenizer(path)
    assert changed.vocab_size == 257 and changed.encode("the") == [256, ord("e")]
    assert changed.fingerprint != tok.fingerprint


def test_tiktoken_pattern_follows_the_official_file_name(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    path = tmp_path / "o200k_base.tiktoken"
    write_tiktoken(path, [b"oW", b"d'"])  # 256, 257: each merge crosses one pattern's split
    o200k = build_tokenizer(str(path))
    cl100k = TiktokenTokenizer(path, pattern="cl100k")  # an explicit pattern wins over the name
    assert o200k.pattern == TIKTOKEN_PATTERNS["o200k"] and cl100k.pattern == TIKTOKEN_PATTERNS["cl100k"]
    # o200k splits at the case change and keeps the contraction ("Hello" "World's": d' merges);
    # cl100k splits before the contraction ("HelloWorld" "'s": oW merges).
    assert o200k.encode("HelloWorld's") == [*b"HelloWorl", 257, ord("s")]
    assert cl100k.encode("HelloWorld's") == [*b"Hell", 256, *b"orld's"]
    assert o200k.fingerprint != cl100k.fingerprint  # token caches keyed by it are not shared
    names = {"cl100k_base.tiktoken": "cl100k", "r50k_base.tiktoken": "gpt2", "p50k_base.tiktoken": "gpt2",
             "o200k_base.tiktoken": "o200k", "mine.tiktoken": None}
    assert {name: tiktoken_pattern_for(tmp_path / name) for name in names} == names
    assert TiktokenTokenizer(path.rename(tmp_path / "mine.tiktoken")).pattern == TIKTOKEN_PATTERNS["cl100k"]


def test_missing_official_tiktoken_file_names_the_absolute_path_and_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        build_tokenizer("o200k_base.tiktoken")
    message = str(err.value)
    assert message.startswith(f"tiktoken file not found: {tmp_path / 'o200k_base.tiktoken'} (fetch ")
    assert "encodings/o200k_base.tiktoken" in message and "--data.tokenizer PATH" in message
    assert "\n" not in message


def test_tiktoken_rejects_files_without_all_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    path = tmp_path / "partial.tiktoken"
    path.write_text(f"{base64.b64encode(b'a').decode()} 0\n")
    with pytest.raises(ValueError, match="256 bytes"):
        TiktokenTokenizer(path, pattern="gpt2")


def test_build_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        build_tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="tiktoken file not found"):
        build_tokenizer(str(tmp_path / "missing.tiktoken"))
    with pytest.raises(ValueError, match="unknown tokenizer"):
        build_tokenizer("word-piece")
    with pytest.raises(ValueError, match="corpus_files"):
        build_tokenizer("bpe")


# ------------------------------------------------------------------------------------------ windows
@settings(max_examples=40, deadline=None)
@given(
    num_tokens=st.integers(2, 400),
    seq_len=st.integers(1, 40),
    seed=st.integers(0, 5),
    epoch=st.integers(0, 5),
    shuffle=st.booleans(),
)
def test_window_sampler_windows_fit_and_do_not_overlap(num_tokens, seq_len, seed, epoch, shuffle):
    if num_tokens < seq_len + 1:
        with pytest.raises(ValueError, match="fewer than one window"):
            WindowSampler(num_tokens, seq_len)
        return
    sampler = WindowSampler(num_tokens, seq_len, shuffle=shuffle, seed=seed)
    sampler.set_epoch(epoch)
    starts = list(sampler)
    assert len(starts) == len(sampler) >= 1
    ordered = sorted(starts)
    assert ordered[0] >= 0 and ordered[-1] + seq_len + 1 <= num_tokens
    assert all(b - a == seq_len for a, b in zip(ordered, ordered[1:], strict=False))  # a shifted grid
    if not shuffle:
        assert starts == list(range(0, len(starts) * seq_len, seq_len))
    else:
        assert starts == list(sampler), "an epoch must replay identically"
        assert len(starts) >= (num_tokens - 1) // seq_len - 1, "at most one window lost to the shift"


def test_window_sampler_epochs_differ_and_ddp_wrapper_splits_consistently():
    sampler = WindowSampler(10_000, 16, shuffle=True, seed=3)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    sampler.set_epoch(0)
    assert list(sampler) == epoch0

    # Lightning wraps a custom sampler like this one under DDP: the ranks must split the same epoch.
    shards = []
    for rank in range(2):
        sampler_on_rank = WindowSampler(10_000, 16, shuffle=True, seed=3)
        wrapper = DistributedSamplerWrapper(sampler_on_rank, num_replicas=2, rank=rank)
        wrapper.set_epoch(1)
        shards.append(list(wrapper))
    sampler.set_epoch(1)
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(sampler)


def test_packed_windows_cover_the_stream_and_stop_when_empty():
    lists = [list(range(0, 10)), [], list(range(10, 31))]
    packed = PackedWindows(lambda: lists, seq_len=4, seed=1, shuffle_windows=3)
    pairs = list(packed)
    assert all(torch.equal(x[1:], y[:-1]) for x, y in pairs)
    starts = sorted(int(x[0]) for x, _ in pairs)
    assert starts == list(range(0, 27, 4))  # (31 - 1) // 4 windows, across the list boundaries
    assert all(torch.equal(x, torch.arange(x[0], x[0] + 4)) for x, _ in pairs)
    assert [int(x[0]) for x, _ in pairs] != starts, "the buffer must shuffle"
    assert list(PackedWindows(lambda: [[1, 2]], seq_len=4, repeat=True)) == []  # no endless empty loop


# ------------------------------------------------------------------------------------------ TextDataModule
def test_local_folder_picks_text_files_only():
    names = [p.relative_to(CORPUS).as_posix() for p in local_files(CORPUS)]
    assert names == ["kitchen.md", "rivers.txt", "sub/stars.txt"]  # not ignored.dat, not .hidden/


def test_text_batches_are_shifted_windows_of_the_corpus(tmp_path):
    dm = make_dm(tmp_path)
    assert dm.vocab_size == 256 and dm.tokenizer.name == "byte"
    text = corpus_text()
    full = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    assert dm.num_train_tokens + dm.num_val_tokens == len(full)
    assert dm.num_val_tokens == int(len(full) * 0.1)
    # Train and validation are the head and the tail of one stream: disjoint by construction.
    np.testing.assert_array_equal(dm.train_dataset.tokens, full[: dm.num_train_tokens])
    np.testing.assert_array_equal(dm.val_dataset.tokens, full[dm.num_train_tokens :])

    batches = list(dm.train_dataloader())
    x, y = batches[0]
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    train_text = text[: dm.num_train_tokens]
    for row_x, row_y in zip(x, y, strict=True):
        assert dm.tokenizer.decode(row_x.tolist() + row_y[-1:].tolist()) in train_text
    assert sum(len(b[0]) for b in batches) == len(dm.train_dataloader().sampler)

    val = list(dm.val_dataloader())
    xs, ys = torch.cat([bx for bx, _ in val]), torch.cat([by for _, by in val])
    assert len(xs) == (dm.num_val_tokens - 1) // 16  # fixed, non-overlapping windows, in order
    val_tokens = torch.from_numpy(full[dm.num_train_tokens :].astype(np.int64))
    for k in range(len(xs)):
        assert torch.equal(xs[k], val_tokens[16 * k : 16 * k + 16])
        assert torch.equal(ys[k], val_tokens[16 * k + 1 : 16 * k + 17])


def test_batches_are_deterministic_per_seed_and_epoch(tmp_path):
    first = next(iter(make_dm(tmp_path, seed=7).train_dataloader()))[0]
    again = make_dm(tmp_path, seed=7)
    assert torch.equal(next(iter(again.train_dataloader()))[0], first)
    assert not torch.equal(next(iter(make_dm(tmp_path, seed=8).train_dataloader()))[0], first)
    loader = again.train_dataloader()
    loader.sampler.set_epoch(1)  # what Lightning does at each epoch start
    assert not torch.equal(next(iter(loader))[0], first)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_the_train_loader_resumes_mid_epoch_as_lightning_restores_it(tmp_path, num_workers):
    def loader():
        return make_dm(tmp_path, seed=5, num_workers=num_workers).train_dataloader()

    def starts(batches):
        return [x[:, 0].tolist() for x, _ in batches]

    reference = loader()
    reference.sampler.set_epoch(1)
    epoch1 = starts(reference)
    assert len(epoch1) >= 4
    crashed = loader()
    crashed.sampler.set_epoch(1)
    it = iter(crashed)
    seen = starts(next(it) for _ in range(3))
    state = crashed.state_dict()

    # Lightning loads the state and creates the iterator before it sets the sampler's epoch.
    resumed = loader()
    resumed.load_state_dict(state)
    it = iter(resumed)
    resumed.sampler.set_epoch(1)
    assert seen + starts(it) == epoch1
    # A pass saved once finished resumes at the start of the next one.
    finished = loader()
    finished.sampler.set_epoch(1)
    assert starts(finished) == epoch1
    state = finished.state_dict()
    again = loader()
    again.load_state_dict(state)
    again.sampler.set_epoch(2)
    epoch2 = starts(again)
    assert len(epoch2) == len(epoch1) and epoch2 != epoch1


def test_the_train_loader_resumes_mid_epoch_under_the_ddp_sampler_wrapper(tmp_path):
    from types import SimpleNamespace

    from spectralds.data.windows import resumable_loader

    def rank0_loader(current_epoch: int):
        # What Lightning does under DDP: the data module's sampler, wrapped, in a re-created loader.
        dm = make_dm(tmp_path, seed=5)
        dm.trainer = SimpleNamespace(current_epoch=current_epoch, global_rank=0, world_size=2)
        loader = dm.train_dataloader()
        wrapper = DistributedSamplerWrapper(loader.sampler, num_replicas=2, rank=0, shuffle=False)
        return resumable_loader(dm.train_dataset, batch_size=4, sampler=wrapper), wrapper

    def starts(batches):
        return [x[:, 0].tolist() for x, _ in batches]

    reference, wrapper = rank0_loader(1)
    wrapper.set_epoch(1)
    epoch1 = starts(reference)
    crashed, wrapper = rank0_loader(1)
    wrapper.set_epoch(1)
    it = iter(crashed)
    seen = starts(next(it) for _ in range(2))
    state = crashed.state_dict()
    resumed, wrapper = rank0_loader(1)  # the resumed trainer's current_epoch
    resumed.load_state_dict(state)
    it = iter(resumed)  # the wrapper lists the offsets here, before Lightning calls set_epoch
    wrapper.set_epoch(1)
    assert seen + starts(it) == epoch1


def test_token_shard_is_reused_and_keyed_by_corpus(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPUS, corpus)
    make_dm(tmp_path, source=str(corpus))
    shards = sorted((tmp_path / "cache").glob("tokens-*.bin"))
    assert len(shards) == 1
    mtime = shards[0].stat().st_mtime_ns

    def no_tokenizing(*args, **kw):
        raise AssertionError("the cached shard should have been reused")

    monkeypatch.setattr(text_module, "write_shard", no_tokenizing)
    dm = make_dm(tmp_path, source=str(corpus), seq_len=8, val_fraction=0.2)  # split settings: same shard
    assert shards[0].stat().st_mtime_ns == mtime and dm.num_val_tokens > 0
    assert pickle.dumps(dm.train_dataset).__len__() < 2_000, "the memmap must not be pickled to workers"
    monkeypatch.undo()

    time.sleep(0.01)
    (corpus / "rivers.txt").write_text("A changed file gives a new shard.\n" * 20)
    dm = make_dm(tmp_path, source=str(corpus))
    assert len(list((tmp_path / "cache").glob("tokens-*.bin"))) == 2
    assert "A changed file" in dm.tokenizer.decode(dm.train_dataset.tokens.tolist())
    make_dm(tmp_path, source=str(corpus), max_bytes=1_000)
    assert len(list((tmp_path / "cache").glob("tokens-*.bin"))) == 3


def test_max_bytes_caps_the_text(tmp_path):
    dm = make_dm(tmp_path, max_bytes=500)
    assert dm.num_train_tokens + dm.num_val_tokens == 500
    assert dm.tokenizer.decode(dm.train_dataset.tokens.tolist()) == corpus_text()[:450]


def test_bpe_tokenizer_in_data_module_is_trained_once(tmp_path, monkeypatch):
    dm = TextDataModule(source=str(CORPUS), tokenizer="bpe", bpe_vocab_size=300, cache_dir=str(tmp_path))
    assert dm.vocab_size == 300  # known before training: the CLI links it to the model
    dm = make_dm(tmp_path, tokenizer="bpe", bpe_vocab_size=300)
    assert 256 < dm.tokenizer.vocab_size <= 300
    tokens = np.concatenate([dm.train_dataset.tokens, dm.val_dataset.tokens])
    assert tokens.dtype == np.uint16 and tokens.max() < dm.tokenizer.vocab_size
    assert dm.tokenizer.decode(tokens.tolist()) == corpus_text()

    def no_training(*args, **kw):
        raise AssertionError("the cached BPE tokenizer should have been reused")

    monkeypatch.setattr(BPETokenizer, "train", no_training)
    again = make_dm(tmp_path, tokenizer="bpe", bpe_vocab_size=300)
    np.testing.assert_array_equal(again.train_dataset.tokens, dm.train_dataset.tokens)


def test_tokenizer_file_in_data_module(tmp_path):
    path = tmp_path / "tokenizer.json"
    build_tokenizer("bpe", corpus_files=CORPUS_FILES, vocab_size=280).save(path)
    dm = make_dm(tmp_path, tokenizer=str(path))
    assert dm.vocab_size == dm.tokenizer.vocab_size <= 280
    assert dm.tokenizer.decode(dm.train_dataset.tokens.tolist()) in corpus_text()


def test_stdlib_source_is_fast(tmp_path):
    start = time.perf_counter()
    dm = make_dm(tmp_path, source="stdlib", max_bytes=200_000, seq_len=64)
    assert dm.num_train_tokens + dm.num_val_tokens == 200_000
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 64) and torch.equal(x[:, 1:], y[:, :-1])
    assert "import" in dm.tokenizer.decode(dm.train_dataset.tokens[:20_000].tolist())
    assert time.perf_counter() - start < 20


def test_text_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="text source not found"):
        TextDataModule(source=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        make_dm(tmp_path, source=str(tmp_path / "empty"))
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "data.bin").write_bytes(b"\0\1")
    with pytest.raises(ValueError, match="no text files"):
        TextDataModule(source=str(tmp_path / "binary"))
    with pytest.raises(ValueError, match="fewer than seq_len"):
        make_dm(tmp_path, seq_len=1024)
    with pytest.raises(ValueError, match="names no dataset"):
        TextDataModule(source="hf:")
    with pytest.raises(ValueError, match="streaming applies"):
        TextDataModule(source=str(CORPUS), streaming=True)
    with pytest.raises(ValueError, match="val_fraction"):
        TextDataModule(source=str(CORPUS), val_fraction=1.0)
    with pytest.raises(ValueError, match="bpe_vocab_size"):
        TextDataModule(source=str(CORPUS), tokenizer="bpe", bpe_vocab_size=10)
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        TextDataModule(source=str(CORPUS), tokenizer=str(tmp_path / "tok.json"))
    with pytest.raises(RuntimeError, match="setup"):
        TextDataModule(source=str(CORPUS)).train_dataloader()
