"""Tokenizers behind one small interface: ``encode``, ``decode``, ``vocab_size`` and ``name``.

* :class:`ByteTokenizer`: the 256 UTF-8 byte values; needs no file and no training.
* :class:`BPETokenizer`: a Hugging Face ``tokenizers`` model, trained locally (byte-level BPE) or read
  from a ``tokenizer.json`` file.
* :class:`TiktokenTokenizer`: a ``.tiktoken`` rank file read from a local path (never downloaded).
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from spectralds.errors import MissingFileError, UserError, first_line
from spectralds.io import atomic_write, input_file

# The pre-tokenization regexes that OpenAI's encodings were trained with. A rank file does not
# record its regex: the right one is named when the file is loaded, or follows an official file name.
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_SUFFIX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"  # o200k keeps a contraction on its word
TIKTOKEN_PATTERNS = {
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "cl100k": (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
        r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
    ),
    # Words split at case changes ("HelloWorld" -> "Hello", "World"), contractions kept on the word.
    "o200k": "|".join([
        rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_SUFFIX}",
        rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_SUFFIX}",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]),
}
# The official rank files, by the start of their names (o200k_base.tiktoken, ...): their pattern.
TIKTOKEN_FILE_PATTERNS = {"o200k": "o200k", "cl100k": "cl100k", "p50k": "gpt2", "r50k": "gpt2"}


class Tokenizer:
    """The interface every tokenizer implements (text <-> token ids in ``[0, vocab_size)``)."""

    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode several texts; subclasses override this where the library runs it in parallel."""
        return [self.encode(text) for text in texts]

    @property
    def fingerprint(self) -> str:
        """A string that changes whenever the text -> ids mapping changes (keys the token caches)."""
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """One token per UTF-8 byte; decoding replaces invalid byte sequences with U+FFFD.

    Encoding takes a byte that is not UTF-8 as Python hands it over from a command line or a file read
    with ``errors="surrogateescape"`` (a lone surrogate U+DC80-U+DCFF) as that byte itself: the model
    reads exactly the bytes given. Any other lone surrogate is a UnicodeEncodeError.
    """

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="surrogateescape"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class BPETokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer``; special tokens are neither added nor skipped."""

    def __init__(self, tokenizer, name: str = "bpe"):
        self.backend = tokenizer
        self.name = name
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Train a byte-level BPE on ``texts``; the result has at most ``vocab_size`` tokens.

        Byte-level means every string can be encoded (no unknown token) and decoding is exact.
        """
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet):
            raise UserError(f"BPE vocab_size must be at least {len(alphabet)} (all bytes), got {vocab_size}")
        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False)
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend, name=f"bpe-{vocab_size}")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> BPETokenizer:
        """Load a ``tokenizer.json`` written by :meth:`save` or by any Hugging Face tokenizer."""
        from tokenizers import Tokenizer as HFTokenizer

        path = _existing_file(path, "tokenizer file")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as err:  # the tokenizers library raises its own exception types
            raise UserError(f"{path} is not a readable tokenizer file ({first_line(err)})") from None
        return cls(backend, name=f"bpe:{path.name}")

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as JSON, atomically (a reader never sees a partial file)."""
        atomic_write(path, self.backend.to_str().encode("utf-8"))

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [enc.ids for enc in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def fingerprint(self) -> str:
        return "bpe:" + hashlib.sha256(self.backend.to_str().encode("utf-8")).hexdigest()[:16]


class TiktokenTokenizer(Tokenizer):
    """A byte-level BPE read from a local ``.tiktoken`` rank file with ``tiktoken``.

    ``pattern`` is the pre-tokenization regex the ranks were trained with: a key of
    :data:`TIKTOKEN_PATTERNS` ("o200k", "cl100k", "gpt2") or a regex. None: the official file's pattern
    when the file name starts like one (see :func:`tiktoken_pattern_for`), else "cl100k". Special
    tokens in the text are encoded as plain text; ``special_tokens`` only extends the vocabulary (and
    ``decode``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        pattern: str | None = None,
        special_tokens: dict[str, int] | None = None,
    ):
        import tiktoken

        path = _existing_file(path, "tiktoken file", _tiktoken_hint(Path(path)))
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        ranks = read_tiktoken_ranks(path, data)
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise UserError(f"{path} is not a byte-level BPE: {len(missing)} of the 256 bytes have no rank")
        key = pattern if pattern is not None else tiktoken_pattern_for(path) or "cl100k"
        self.pattern = TIKTOKEN_PATTERNS.get(key, key)
        self.special_tokens = dict(special_tokens or {})
        self.name = f"tiktoken:{path.name}"
        self.path = path  # the rank file (its Hugging Face conversion reads it again)
        self.backend = tiktoken.Encoding(
            self.name, pat_str=self.pattern, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.vocab_size = self.backend.n_vocab
        identity = f"{digest}|{self.pattern}|{sorted(self.special_tokens.items())}"
        self._fingerprint = "tiktoken:" + hashlib.sha256(identity.encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.backend.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.backend.encode_ordinary_batch(texts)

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode([int(i) for i in ids], errors="replace")

    @property
    def fingerprint(self) -> str:
        return self._fingerprint


MAX_TIKTOKEN_RANK = 2**24 - 1  # 84x o200k's ranks: a model's vocabulary is the largest rank + 1


def read_tiktoken_ranks(path: Path, data: bytes) -> dict[bytes, int]:
    """The ranks of a ``.tiktoken`` file's bytes `data`: one ``<base64 token> <rank>`` per line.

    Read here rather than by tiktoken's loader, which names no line (and "too many values to unpack" for
    a line of three fields) and lets duplicate ranks through to a Rust panic: every problem is a one-line
    UserError naming the file and the line.
    """
    ranks: dict[bytes, int] = {}
    rank_lines: dict[int, int] = {}
    token_lines: dict[bytes, int] = {}
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        token, rank, problem = _rank_line(line)
        if problem is None and token in token_lines:
            problem = f"repeats the token of line {token_lines[token]} ({token!r})"
        if problem is None and rank in rank_lines:
            problem = f"repeats rank {rank} of line {rank_lines[rank]}"
        if problem is not None:
            raise UserError(f"{path} is not a .tiktoken rank file: line {number} {problem}")
        ranks[token], rank_lines[rank], token_lines[token] = rank, number, number
    return ranks


def _rank_line(line: bytes) -> tuple[bytes, int, str | None]:
    """(token, rank, None) of one line of a rank file, or (.., .., what is wrong with it)."""
    fields = line.split()
    if len(fields) != 2:
        return b"", -1, f"has {len(fields)} field{'s' * (len(fields) != 1)}, expected '<base64 token> <rank>'"
    try:
        token = base64.b64decode(fields[0], validate=True)
    except ValueError:
        return b"", -1, f"has a token that is not base64: {fields[0][:40]!r}"
    if not fields[1].isdigit() or int(fields[1]) > MAX_TIKTOKEN_RANK:
        return b"", -1, f"has rank {fields[1][:40]!r}, expected an integer from 0 to {MAX_TIKTOKEN_RANK}"
    return token, int(fields[1]), None


def build_tokenizer(
    spec: str,
    corpus_files: Sequence[str | os.PathLike] | None = None,
    vocab_size: int | None = None,
) -> Tokenizer:
    """Build a tokenizer from a short spec.

    ``"byte"``; ``"bpe"`` (train a byte-level BPE of ``vocab_size`` tokens on ``corpus_files``);
    a path to a ``tokenizer.json``; or a path to a ``.tiktoken`` file (pre-tokenization pattern from
    the file name: see :func:`tiktoken_pattern_for`). Relative paths are read from the current directory.
    """
    if spec == "byte":
        return ByteTokenizer()
    if spec == "bpe":
        if not corpus_files or vocab_size is None:
            raise UserError("tokenizer 'bpe' needs corpus_files and vocab_size to train on")
        files = [_existing_file(f, "corpus file") for f in corpus_files]
        texts = (f.read_text(encoding="utf-8", errors="replace") for f in files)
        return BPETokenizer.train(texts, vocab_size)
    path = Path(spec).expanduser()
    if path.suffix == ".json":
        return BPETokenizer.from_file(path)
    if path.suffix == ".tiktoken":
        return TiktokenTokenizer(path)
    raise UserError(
        f"unknown tokenizer {spec!r}: expected 'byte', 'bpe', a path to tokenizer.json or to a .tiktoken file"
    )


def tiktoken_pattern_for(path: str | os.PathLike) -> str | None:
    """The pattern key of the official encoding a rank file is named after: o200k_base.tiktoken ->
    "o200k", cl100k_base -> "cl100k", r50k_base / p50k_base -> "gpt2"; None for any other name."""
    name = Path(path).name
    return next((key for start, key in TIKTOKEN_FILE_PATTERNS.items() if name.startswith(start)), None)


def _tiktoken_hint(path: Path) -> str:
    """What to do about a missing official rank file (tiktoken's own download address)."""
    if tiktoken_pattern_for(path) is None or not path.name.endswith("_base.tiktoken"):
        return ""
    url = f"https://openaipublic.blob.core.windows.net/encodings/{path.name}"
    return (f" (fetch {path.name} once, e.g. from {url}, and give its path: --data.tokenizer PATH to "
            "fit, --tokenizer PATH to generate and eval)")


def _existing_file(path: str | os.PathLike, what: str, hint: str = "") -> Path:
    """`path`, which must be a file (`io.input_file`); the error names the absolute path looked for (a
    relative one is read from the current directory) and, when it is missing, `hint`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingFileError(f"{what} not found: {path.absolute()}{hint}")
    input_file(path.absolute(), what)
    return path
