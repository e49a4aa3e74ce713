"""`spectralds generate`: text from a checkpoint, one prompt or a batch of them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from spectralds.checkpoint_io import read_checkpoint
from spectralds.cli_errors import usage_error
from spectralds.cli_signature import library_defaults
from spectralds.errors import UserError, check_float, check_int, first_line, require
from spectralds.generate import generate as generate_tokens
from spectralds.layers import DECODE_METHODS

GENERATE_DEFAULTS = library_defaults(generate_tokens)


def _read_prompts(path: str) -> list[str]:
    """One prompt per line; an empty line or file is an error, never an empty prompt."""
    try:
        with open(path, encoding="utf-8") as f:
            texts = f.read().splitlines() or [""]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the prompts file {path} ({first_line(e)})") from e
    blank = next((n for n, t in enumerate(texts, 1) if not t.strip()), None)
    require(blank is None, f"line {blank} of the prompts file {path} is empty")
    return texts


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
        prompt: a text to continue; repeat it for several (all decode as one batch)
        prompts_file: a UTF-8 text file of prompts, one per line
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
    prompts = [torch.tensor(token_codec.encode(text), dtype=torch.long) for text in texts]
    for i, ids in enumerate(prompts):
        require(ids.numel() > 0, "the prompt is empty" + (f" (prompt {i + 1})" if len(texts) > 1 else ""))
    generator = torch.Generator().manual_seed(seed)
    # All prompts decode as one batch (different lengths included): each greedy completion is the one
    # that prompt gets alone.
    outs = generate_tokens(model, prompts, max_new_tokens, temperature, top_k, generator,
                           prefill_chunk=prefill_chunk)
    for i, out in enumerate(outs):
        if len(outs) > 1:
            print(f"=== completion {i + 1}/{len(outs)} ===")
        print(token_codec.decode(out.tolist()))
