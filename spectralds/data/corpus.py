"""Local text corpora: which files make one, how to read them in pieces, and a byte budget."""

from __future__ import annotations

import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

from spectralds.errors import MissingFileError, UserError

# Suffixes treated as text when a folder is given as the source (hidden files are skipped).
TEXT_SUFFIXES = frozenset(
    ".txt .text .md .rst .tex .py .c .h .cc .cpp .hpp .rs .go .java .js .ts .sh .html .xml .json .jsonl"
    " .csv .tsv .yaml .yml .toml .cfg .ini".split()
)
# Appended after every document so documents are told apart in the flat token stream.
DOC_SEPARATOR = "\n\n"
# Long files are tokenized in pieces of about this many characters, cut at line ends.
PIECE_CHARS = 1 << 20


def stdlib_files() -> list[Path]:
    """The Python standard library's own ``.py`` files, sorted (no site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p
        for p in root.rglob("*.py")
        if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts) and p.is_file()
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def local_files(path: str | Path) -> list[Path]:
    """A text file, or the sorted text-like files under a folder (see :data:`TEXT_SUFFIXES`)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingFileError(f"text source not found: {path}")
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"text source {path} is neither a file nor a folder")
    files = [
        p
        for p in path.rglob("*")
        if p.suffix.lower() in TEXT_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    ]
    if not files:
        raise UserError(f"no text files ({', '.join(sorted(TEXT_SUFFIXES))}) under {path}")
    return sorted(files, key=lambda p: p.relative_to(path).as_posix())


def file_signature(files: list[Path]) -> list[tuple[str, int, int]]:
    """(path, size, mtime) per file: enough to notice that a corpus changed."""
    signature = []
    for f in files:
        stat = f.stat()
        signature.append((str(f.resolve()), stat.st_size, stat.st_mtime_ns))
    return signature


def read_file_pieces(path: Path) -> Iterator[str]:
    """The file's text (UTF-8, invalid bytes replaced) in pieces of about PIECE_CHARS, cut at line ends."""
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        carry = ""
        while chunk := f.read(PIECE_CHARS):
            chunk = carry + chunk
            cut = chunk.rfind("\n") + 1
            if cut == 0:  # no line end yet: keep reading unless the piece is already large
                cut = len(chunk) if len(chunk) >= 4 * PIECE_CHARS else 0
            carry = chunk[cut:]
            if cut:
                yield chunk[:cut]
        if carry:
            yield carry


def documents_to_pieces(documents: Iterable[Iterable[str]]) -> Iterator[str]:
    """Flatten documents (iterables of text pieces), with DOC_SEPARATOR after each non-empty one."""
    for document in documents:
        empty = True
        for piece in document:
            if piece:
                empty = False
                yield piece
        if not empty:
            yield DOC_SEPARATOR


def cap_bytes(pieces: Iterable[str], max_bytes: int | None) -> Iterator[str]:
    """Pass pieces through until ``max_bytes`` bytes of UTF-8 have gone by (None: no cap).

    The piece that crosses the budget is cut at a character boundary.
    """
    if max_bytes is None:
        yield from pieces
        return
    budget = max_bytes
    for piece in pieces:
        data = piece.encode("utf-8")
        if len(data) >= budget:
            head = data[:budget].decode("utf-8", errors="ignore")
            if head:
                yield head
            return
        budget -= len(data)
        yield piece


def local_pieces(files: list[Path], max_bytes: int | None) -> Iterator[str]:
    """The corpus text of ``files``, one document per file, capped at ``max_bytes``."""
    return cap_bytes(documents_to_pieces(read_file_pieces(f) for f in files), max_bytes)
