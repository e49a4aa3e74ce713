"""Our byte, BPE and tiktoken tokenizers as Hugging Face tokenizer files: `AutoTokenizer` on the written
directory encodes and decodes exactly as ours do, on varied text (non-ASCII, emoji, special-looking text)."""

import base64
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tiktoken")
from transformers import AutoTokenizer  # noqa: E402

from spectralds.data.tokenizers import BPETokenizer, ByteTokenizer, TiktokenTokenizer  # noqa: E402
from spectralds.interop.hf_tokenizer import save_hf_tokenizer  # noqa: E402

TEXTS = [
    "def main(argv):\n    return 0\n\n",
    "The weather, and the rivers: 東京 🙂 naïve café — ÅÄÖ\t tabs  and   spaces\r\n",
    "Ċ is Maltese; Ā ā Ń are Latin Extended-A (the ByteLevel alphabet's own characters)",
    "<|endoftext|> <s></s> [PAD] looks special but is text",
    "I'm HelloWorld's you'll DON'T 12345 3.14159 x+=1;",
    "",
    " leading space and trailing \n\n",
]
CORPUS = "\n\n".join(TEXTS[:5] * 20) + " the quick brown fox jumps over the lazy dog " * 50


def roundtrip(tokenizer, directory: Path):
    save_hf_tokenizer(tokenizer, directory, max_length=64)
    hf = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=True)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text
        assert hf.decode(ids) == tokenizer.decode(ids) == text
        assert hf.decode(ids, skip_special_tokens=True) == text  # no id of ours is skipped
    # bos = eos = the token our lm-eval backend puts before an empty context (the separator's last)
    assert hf.bos_token_id == hf.eos_token_id == hf.pad_token_id == tokenizer.encode("\n\n")[-1]
    batch = hf(TEXTS[:2], add_special_tokens=False, padding=True)  # left padding, the one our models take
    short = len(tokenizer.encode(TEXTS[0]))
    assert batch["attention_mask"][0] == [0] * (len(batch["input_ids"][0]) - short) + [1] * short
    assert hf.model_max_length == 64
    return hf


def test_byte_tokenizer_maps_each_byte_to_its_value(tmp_path):
    hf = roundtrip(ByteTokenizer(), tmp_path)
    assert hf.encode("aé\x00\xff", add_special_tokens=False) == [97, 195, 169, 0, 195, 191]
    assert len(hf) == 256 and hf.bos_token_id == 10
    assert hf.decode([104, 0xC3]) == ByteTokenizer().decode([104, 0xC3]) == "h\ufffd"  # a cut character


def test_bpe_tokenizer(tmp_path):
    bpe = BPETokenizer.train([CORPUS], 400)
    hf = roundtrip(bpe, tmp_path)
    assert len(hf) == bpe.vocab_size
    assert len(bpe.encode(TEXTS[0])) < len(TEXTS[0].encode())  # the merges are used


def write_tiktoken(path: Path, texts: str) -> None:
    """A rank file: the 256 bytes, then the merges a BPE learns on `texts`, each as its bytes."""
    bpe = BPETokenizer.train([texts], 420)
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    vocab = sorted(bpe.backend.get_vocab().items(), key=lambda item: item[1])
    ranks = [bytes([b]) for b in range(256)]
    ranks += [t for t in (bytes(byte_of[c] for c in token) for token, _ in vocab) if len(t) > 1]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))


@pytest.mark.parametrize("name", ["o200k_base.tiktoken", "cl100k_base.tiktoken", "r50k_base.tiktoken"])
def test_tiktoken_tokenizer_with_its_pattern(tmp_path, monkeypatch, name):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    write_tiktoken(tmp_path / name, CORPUS)
    tok = TiktokenTokenizer(tmp_path / name)
    hf = roundtrip(tok, tmp_path / "hf")
    assert len(hf) == tok.vocab_size > 300
    assert len(tok.encode(TEXTS[0])) < len(TEXTS[0].encode())


def test_tiktoken_special_tokens_keep_their_ids_and_stay_text(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    write_tiktoken(tmp_path / "cl100k_base.tiktoken", CORPUS)
    plain = TiktokenTokenizer(tmp_path / "cl100k_base.tiktoken")
    specials = {"<|endoftext|>": plain.vocab_size}
    tok = TiktokenTokenizer(tmp_path / "cl100k_base.tiktoken", special_tokens=specials)
    hf = roundtrip(tok, tmp_path / "hf")
    assert hf.convert_tokens_to_ids("<|endoftext|>") == plain.vocab_size
    assert hf.decode([plain.vocab_size]) == tok.decode([plain.vocab_size]) == "<|endoftext|>"
