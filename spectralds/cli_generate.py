"""`spectralds generate`: text from a checkpoint, one prompt or a batch of them."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from typing import Literal

from spectralds.checkpoint_io import read_checkpoint
from spectralds.cli_errors import usage_error
from spectralds.cli_signature import library_defaults
from spectralds.errors import UserError, check_float, check_int, first_line, require
from spectralds.generate import generate as generate_tokens
from spectralds.layers import DECODE_METHODS

GENERATE_DEFAULTS = library_defaults(generate_tokens)


MAX_PROMPTS_BYTES = 2**24  # every prompt must fit a model's context: far more than any batch of them


def _read_prompts(path: str) -> list[str]:
    """One prompt per line; an empty line or file is an error, never an empty prompt.

    Lines end at LF or CRLF only: a form feed, VT, FS, GS, RS, NEL, U+2028 or U+2029 inside a line (each
    a line boundary to `str.splitlines`) stays in its prompt, as does a lone CR. A UTF-8
    byte order mark at the start of the file is not text.
    """
    try:
        info = os.stat(path)  # stat, not open: /dev/zero would be read until memory runs out, a FIFO block
        if not stat.S_ISREG(info.st_mode):
            what = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file (a device or a FIFO)"
            raise UserError(f"the prompts file {path} is {what}")
        if info.st_size > MAX_PROMPTS_BYTES:
            raise UserError(f"the prompts file {path} has {info.st_size:,} bytes, more than the "
                            f"{MAX_PROMPTS_BYTES:,} prompts could use")
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the prompts file {path} ({first_line(e)})") from e
    texts = text.removesuffix("\n").split("\n")
    texts = [t.removesuffix("\r") for t in texts]
    blank = next((n for n, t in enumerate(texts, 1) if not t.strip()), None)
    require(blank is None, f"line {blank} of the prompts file {path} is empty")
    return texts


def _encode(codec, text: str, index: int, count: int) -> list[int]:
    """The prompt's ids. A byte that is not UTF-8 (on a command line Python hands it over as a lone
    surrogate) is that byte for the byte tokenizer; any other tokenizer needs UTF-8 text (tiktoken would
    silently read U+FFFD instead)."""
    from spectralds.data.tokenizers import ByteTokenizer

    try:
        if not isinstance(codec, ByteTokenizer):
            text.encode("utf-8")
        return codec.encode(text)
    except UnicodeEncodeError as e:
        char = text[e.start]
        what = f"byte 0x{ord(char) - 0xDC00:02x}" if 0xDC80 <= ord(char) <= 0xDCFF else repr(char)
        which = f"prompt {index + 1}" if count > 1 else "the prompt"
        raise UserError(f"{which} holds {what} at character {e.start + 1}, which is not UTF-8 text: the "
                        f"{codec.name} tokenizer encodes text only (the byte tokenizer takes any byte)"
                        ) from None


def generate(
    *,
    ckpt: str,
    prompt: Sequence[str] = (),
    prompts_file: str | None = None,
    max_new_tokens: int = 200,
    temperature: float = GENERATE_DEFAULTS["temperature"],
    top_k: int | None = GENERATE_DEFAULTS["top_k"],
    tokenizer: str | None = None,
    decode: Literal[DECODE_METHODS] | None = None,
    prefill_chunk: int | None = GENERATE_DEFAULTS["prefill_chunk"],
    seed: int = 0,
) -> None:
    """Generate text from a checkpoint.

    Args:
        ckpt: a checkpoint written by `spectralds fit`
        prompt: a text to continue; repeat it for several (all decode as one batch). A byte that is not
            UTF-8 reaches the byte tokenizer as that byte; other tokenizers refuse it
        prompts_file: a UTF-8 text file of prompts, one per line (a line ends at LF or CRLF only; a leading
            byte order mark is dropped)
        max_new_tokens: tokens to generate (>= 1)
        temperature: 0 = greedy
        top_k: sample from the k likeliest tokens (None: all)
        tokenizer: tokenizer (None: the one the model trained with)
        decode: how STU layers decode (None: each layer's default, FutureFill)
        prefill_chunk: prefill long prompts this many tokens at a time, so the prefill's memory is
            bounded by the chunk (the same tokens; None: the whole prompt at once)
        seed: sampling seed
    """
    import torch

    from spectralds.checkpoint_io import load_model, tokenizer_spec
    from spectralds.data import build_tokenizer
    from spectralds.generate import set_decode_method

    # Every argument is checked before the checkpoint is read or a token decoded.
    check_int("--max-new-tokens", max_new_tokens, minimum=1)
    check_float("--temperature", temperature, minimum=0.0)
    check_int("--seed", seed, minimum=0, maximum=2**64 - 1)  # what torch.Generator.manual_seed takes
    if top_k is not None:
        check_int("--top-k", top_k, minimum=1)
    if prefill_chunk is not None:
        check_int("--prefill-chunk", prefill_chunk, minimum=1)
    texts = [*prompt, *(_read_prompts(prompts_file) if prompts_file else [])]
    if not texts:
        raise usage_error("spectralds generate",
                          "the following arguments are required: --prompt (or --prompts-file)")
    for i, text in enumerate(texts):
        require(text != "", "the prompt is empty" + (f" (prompt {i + 1})" if len(texts) > 1 else ""))
    checkpoint = read_checkpoint(ckpt)
    model = load_model(ckpt, checkpoint=checkpoint)  # refuses NaN/Inf weights
    if decode is not None and set_decode_method(model, decode) == 0:
        raise UserError(f"--decode {decode}: this model has no layer that decodes that way (only STU and "
                        "STU-T layers have decoding methods to choose)")
    spec = tokenizer or tokenizer_spec(checkpoint)
    if spec == "bpe":
        raise UserError(
            "this model used a BPE tokenizer trained on its corpus: pass --tokenizer tokenizer.json"
        )
    token_codec = build_tokenizer(spec)
    vocab = dict(getattr(model, "hparams", {})).get("vocab_size")
    if vocab is not None and token_codec.vocab_size > vocab:
        raise UserError(f"the tokenizer {token_codec.name} has {token_codec.vocab_size} tokens but the "
                        f"model's vocab_size is {vocab}")
    prompts = [torch.tensor(_encode(token_codec, text, i, len(texts)), dtype=torch.long)
               for i, text in enumerate(texts)]
    for i, ids in enumerate(prompts):
        require(ids.numel() > 0, "the prompt is empty" + (f" (prompt {i + 1})" if len(texts) > 1 else ""))
    generator = torch.Generator().manual_seed(seed)
    # All prompts decode as one batch (different lengths included): each greedy completion is the one
    # that prompt gets alone.
    # Only ids the tokenizer can decode: a model's vocabulary may be padded past the tokenizer's.
    outs = generate_tokens(model, prompts, max_new_tokens, temperature, top_k, generator,
                           prefill_chunk=prefill_chunk, vocab_size=token_codec.vocab_size)
    for i, out in enumerate(outs):
        if len(outs) > 1:
            print(f"=== completion {i + 1}/{len(outs)} ===")
        print(token_codec.decode(out.tolist()))
