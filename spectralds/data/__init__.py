"""Data for spectralds: tokenizers, text corpora as token windows, the synthetic LDS task, ListOps.

This package imports nothing else from spectralds.
"""

from .listops import ListOpsDataModule
from .synthetic import DiagonalLDS, SyntheticLDSDataModule
from .text import TextDataModule
from .tokenizers import BPETokenizer, ByteTokenizer, TiktokenTokenizer, Tokenizer, build_tokenizer

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "DiagonalLDS",
    "ListOpsDataModule",
    "SyntheticLDSDataModule",
    "TextDataModule",
    "TiktokenTokenizer",
    "Tokenizer",
    "build_tokenizer",
]
