"""Tokenizer files that are not what they claim: a `.tiktoken` rank file with duplicate ranks (a Rust
panic in tiktoken), repeated tokens, garbage lines, ranks beyond the bound, and a garbage tokenizer in
`spectralds fit` are each one line naming the file (and the line); the byte tokenizer takes a byte that
is not UTF-8 (as Python hands it over from a command line) as exactly that byte."""

import base64
import re
from pathlib import Path

import pytest
from cli_helpers import one_line_error

from spectralds.data import ByteTokenizer, TiktokenTokenizer
from spectralds.data.tokenizers import MAX_TIKTOKEN_RANK
from spectralds.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "tests" / "assets" / "configs" / "tiny_lm.yaml")
CORPUS = str(ROOT / "tests" / "assets" / "data" / "corpus")


def rank_lines(merges: list[bytes] = ()) -> list[str]:
    """The lines of a valid rank file: the 256 bytes, then `merges`, at ranks 0, 1, ..."""
    tokens = [bytes([b]) for b in range(256)] + list(merges)
    return [f"{base64.b64encode(t).decode()} {r}" for r, t in enumerate(tokens)]


def rank_file(tmp_path: Path, lines: list[str], name: str = "mine.tiktoken") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def b64(token: bytes) -> str:
    return base64.b64encode(token).decode()


@pytest.mark.parametrize(
    "extra, expected",
    [
        ([f"{b64(b'ab')} 5"], "line 257 repeats rank 5 of line 6"),
        ([f"{b64(b'a')} 256"], "line 257 repeats the token of line 98 (b'a')"),
        (["hello world foo"], "line 257 has 3 fields, expected '<base64 token> <rank>'"),
        (["justonefield"], "line 257 has 1 field, expected"),
        (["*** 256"], "line 257 has a token that is not base64: b'***'"),
        ([f"{b64(b'ab')} -3"], "line 257 has rank b'-3', expected an integer from 0 to"),
        ([f"{b64(b'ab')} x1"], "line 257 has rank b'x1'"),
        ([f"{b64(b'ab')} {MAX_TIKTOKEN_RANK + 1}"], f"line 257 has rank b'{MAX_TIKTOKEN_RANK + 1}'"),
    ],
    ids=["duplicate-rank", "duplicate-token", "three-fields", "one-field", "not-base64", "negative",
         "not-a-number", "rank-beyond-bound"],
)
def test_bad_rank_files_name_the_file_and_line(extra, expected, tmp_path):
    path = rank_file(tmp_path, rank_lines() + extra)
    with pytest.raises(UserError, match=f"{path} is not a .tiktoken rank file: " + re.escape(expected)):
        TiktokenTokenizer(path)


def test_binary_garbage_is_one_line(tmp_path):
    path = tmp_path / "garbage.tiktoken"
    path.write_bytes(b"\xff\xfe\x00garbage 7\n\x01\x02 3 4\n")
    with pytest.raises(UserError, match="line 1 has a token that is not base64"):
        TiktokenTokenizer(path)


def test_a_valid_file_with_blank_lines_and_crlf_loads(tmp_path):
    path = tmp_path / "ok.tiktoken"
    path.write_bytes(("\r\n".join(rank_lines([b"th", b"the"])) + "\r\n\r\n").encode())
    tok = TiktokenTokenizer(path)
    assert tok.vocab_size == 258 and tok.encode("the") == [257]


@pytest.mark.usefixtures("cli_env")
@pytest.mark.parametrize("kind", ["tiktoken", "json"])
def test_garbage_tokenizer_in_fit_names_the_file(kind, capsys, tmp_path):
    """It said "too many values to unpack (expected 2)"."""
    path = tmp_path / f"garbage.{kind}"
    path.write_text("hello world foo\n")
    args = ["fit", "--config", TINY, f"--data.source={CORPUS}", f"--data.tokenizer={path}"]
    err = one_line_error(capsys, args)
    assert str(path) in err and "unpack" not in err
    assert not (tmp_path / "runs").exists()


def test_byte_tokenizer_takes_undecodable_bytes_as_bytes():
    raw = b"a\xffb\xc3("
    text = raw.decode("utf-8", errors="surrogateescape")  # how Python reads such a byte from argv
    assert ByteTokenizer().encode(text) == list(raw)
    with pytest.raises(UnicodeEncodeError):
        ByteTokenizer().encode("\ud800")  # a surrogate that is no byte: not text, not a byte


@pytest.mark.parametrize("kind", ["dir", "fifo"])
@pytest.mark.parametrize("suffix", [".tiktoken", ".json"])
def test_a_tokenizer_path_that_is_no_file_says_what_it_is(kind, suffix, tmp_path):
    import os

    from spectralds.data import build_tokenizer

    path = tmp_path / f"tok{suffix}"
    path.mkdir() if kind == "dir" else os.mkfifo(path)
    expected = "is a directory" if kind == "dir" else "is not a regular file"
    with pytest.raises(UserError, match=re.escape(f"{path} {expected}")):
        build_tokenizer(str(path))
