"""Our tokenizers as Hugging Face tokenizer files (tokenizer.json + tokenizer_config.json).

* byte: a byte-level BPE with no merges whose vocabulary maps each byte's ByteLevel character to the
  byte's value, so every byte is its own id, as `ByteTokenizer` encodes;
* BPE: already a `tokenizers` model, written as it is;
* tiktoken: the ranks as a BPE vocabulary (id = rank) with the merges that reproduce them, behind the
  same pre-tokenization regex (transformers' own `TikTokenConverter`).

Special tokens: our tokenizers encode every text as plain text and decode every id, so the HF tokenizer
does too (`split_special_tokens`, and `SpectralDSTokenizer` never skips an id when decoding). bos and eos
name the token our lm-eval backend puts before an empty context (the last token of the document
separator), so lm-eval's `hf` backend scores with the same prefix and pads with a real id.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from spectralds import __version__
from spectralds.errors import UserError

if TYPE_CHECKING:  # spectralds.data is imported where used: registering the classes stays light
    from spectralds.data.tokenizers import Tokenizer

try:  # the class below needs transformers; without it only `require_transformers` is reached
    from transformers import PreTrainedTokenizerFast
except ImportError:  # pragma: no cover - exercised by the missing-transformers test via hf_require
    PreTrainedTokenizerFast = object

AUTO_TOKENIZER = [None, "tokenization_spectralds.SpectralDSTokenizer"]


class SpectralDSTokenizer(PreTrainedTokenizerFast):
    """A `tokenizers` tokenizer that decodes every id as text, as ours do: bos / eos are an ordinary
    token of the vocabulary (a newline, say), which `skip_special_tokens` must not drop."""

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        return super()._decode(token_ids, skip_special_tokens=False, **kwargs)


def backend_tokenizer(tokenizer: Tokenizer):
    """A `tokenizers.Tokenizer` encoding and decoding exactly as `tokenizer` does."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from spectralds.data.tokenizers import BPETokenizer, ByteTokenizer, TiktokenTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        vocab = {char: byte for byte, char in bytes_to_unicode().items()}
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        return backend
    if isinstance(tokenizer, BPETokenizer):
        return HFTokenizer.from_str(tokenizer.backend.to_str())
    if isinstance(tokenizer, TiktokenTokenizer):
        from transformers.convert_slow_tokenizer import TikTokenConverter

        pattern = oniguruma_pattern(tokenizer.pattern)
        backend = TikTokenConverter(vocab_file=str(tokenizer.path), pattern=pattern).converted()
        _add_specials(backend, tokenizer.special_tokens)
        return backend
    raise UserError(f"no Hugging Face form for tokenizer {type(tokenizer).__name__}: "
                    "byte, BPE (tokenizer.json) and tiktoken tokenizers can be exported")


# One atom (a \p{..} class, a [...] set, an escape or a character) with a possessive interval X{n,m}+.
_POSSESSIVE_INTERVAL = re.compile(r"(\\[pP]\{\w+\}|\[(?:\\.|[^\]])*\]|\\.|[^\\()])(\{\d+(?:,\d*)?\})\+")


def oniguruma_pattern(pattern: str) -> str:
    """tiktoken's regex (Rust fancy-regex) for the `tokenizers` library (Oniguruma, Ruby syntax), where
    `X{n,m}+` is not possessive but a repetition of X{n,m} ("12345" would be one piece, not "123", "45"):
    written as the atomic group (?>X{n,m}) instead. ?+, *+ and ++ mean the same in both."""
    converted = _POSSESSIVE_INTERVAL.sub(r"(?>\1\2)", pattern)
    if re.search(r"\{\d+(?:,\d*)?\}\+", converted):
        raise UserError(f"cannot convert the tiktoken pattern {pattern!r}: a possessive interval on a group")
    return converted


def _add_specials(backend, specials: dict[str, int]) -> None:
    """tiktoken special tokens at their own ids (added tokens take the next free id, in order)."""
    from tokenizers import AddedToken

    for text, index in sorted(specials.items(), key=lambda item: item[1]):
        if backend.get_vocab_size(with_added_tokens=True) != index:
            raise UserError(f"tiktoken special token {text!r} has id {index}, not the next free id "
                            f"{backend.get_vocab_size(with_added_tokens=True)}: it cannot be exported")
        backend.add_special_tokens([AddedToken(text, normalized=False, special=True)])


def write_code_file(directory: str | os.PathLike, name: str, cls: str, module: str) -> None:
    """A code file of an exported directory: one import of `cls` from the installed spectralds, so the
    directory's code is versioned with the package (trust_remote_code loads it)."""
    text = (f'"""spectralds {__version__}: the class lives in the installed spectralds package '
            f'(pip install "spectralds[hf]")."""\n\nfrom {module} import {cls}  # noqa: F401\n')
    (Path(directory) / name).write_text(text, encoding="utf-8")


def save_hf_tokenizer(tokenizer: Tokenizer, out_dir: str | os.PathLike, max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json (and transformers' companions) and the tokenizer's
    code file into out_dir."""
    from spectralds.data.corpus import DOC_SEPARATOR

    backend = backend_tokenizer(tokenizer)
    prefix = backend.id_to_token(tokenizer.encode(DOC_SEPARATOR)[-1])
    fast = SpectralDSTokenizer(
        tokenizer_object=backend, bos_token=prefix, eos_token=prefix, pad_token=prefix,
        model_max_length=max_length, split_special_tokens=True, clean_up_tokenization_spaces=False,
        padding_side="left",  # the only padding our models take (HF's `start`, see hf_model)
    )
    fast._auto_map = {"AutoTokenizer": AUTO_TOKENIZER}  # what save_pretrained writes as auto_map
    fast.save_pretrained(str(out_dir))
    write_code_file(out_dir, "tokenization_spectralds.py", "SpectralDSTokenizer", __name__)
