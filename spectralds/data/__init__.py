"""Data for spectralds: tokenizers, text corpora as token windows, and the synthetic LDS task.

This package imports nothing else from spectralds.
"""

from .synthetic import DiagonalLDS, SyntheticLDSDataModule
from .text import TextDataModule
from .tokenizers import BPETokenizer, ByteTokenizer, TiktokenTokenizer, Tokenizer, build_tokenizer

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "DiagonalLDS",
    "SyntheticLDSDataModule",
    "TextDataModule",
    "TiktokenTokenizer",
    "Tokenizer",
    "build_tokenizer",
]
