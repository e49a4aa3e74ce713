"""`spectralds generate`: text from a checkpoint, one prompt or a batch of them."""

from __future__ import annotations

from spectralds.checkpoint_io import read_checkpoint
from spectralds.cli_errors import CommandParser
from spectralds.errors import UserError, check_float, check_int, first_line, require
from spectralds.layers import DECODE_METHODS


def generate_main(argv: list[str]) -> None:
    import torch

    from spectralds.checkpoint_io import load_model, tokenizer_spec
    from spectralds.data import build_tokenizer
    from spectralds.generate import generate, set_decode_method

    p = CommandParser("spectralds generate", "Generate text from a checkpoint.")
    p.add_argument("--ckpt", required=True, help="a checkpoint written by `spectralds fit`")
    p.add_argument("--prompt", action="append", default=[],
                   help="a text to continue; repeat it for several (all decode as one batch)")
    p.add_argument("--prompts-file", default=None, help="a UTF-8 text file of prompts, one per line")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (>= 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens (None: all)")
    p.add_argument("--tokenizer", default=None, help="tokenizer (None: the one the model trained with)")
    p.add_argument("--decode", choices=DECODE_METHODS, default=DECODE_METHODS[0], help="STU decoding")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    a = p.parse_args(argv)
    # Every argument is checked before the checkpoint is read or a token decoded.
    check_int("--max-new-tokens", a.max_new_tokens, minimum=1)
    check_float("--temperature", a.temperature, minimum=0.0)
    if a.top_k is not None:
        check_int("--top-k", a.top_k, minimum=1)
    texts = list(a.prompt)
    if a.prompts_file:  # one prompt per line; an empty line or file is an error, never an empty prompt
        try:
            with open(a.prompts_file, encoding="utf-8") as f:
                texts += f.read().splitlines() or [""]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read the prompts file {a.prompts_file} ({first_line(e)})") from e
        blank = next((n for n, t in enumerate(texts[len(a.prompt) :], 1) if not t.strip()), None)
        require(blank is None, f"line {blank} of the prompts file {a.prompts_file} is empty")
    if not texts:
        p.error("the following arguments are required: --prompt (or --prompts-file)")
    for i, text in enumerate(texts):
        require(text != "", "the prompt is empty" + (f" (prompt {i + 1})" if len(texts) > 1 else ""))
    checkpoint = read_checkpoint(a.ckpt)
    model = load_model(a.ckpt, checkpoint=checkpoint)  # refuses NaN/Inf weights
    set_decode_method(model, a.decode)
    spec = a.tokenizer or tokenizer_spec(checkpoint)
    if spec == "bpe":
        raise UserError(
            "this model used a BPE tokenizer trained on its corpus: pass --tokenizer tokenizer.json"
        )
    tokenizer = build_tokenizer(spec)
    prompts = [torch.tensor(tokenizer.encode(text), dtype=torch.long) for text in texts]
    for i, prompt in enumerate(prompts):
        require(prompt.numel() > 0, "the prompt is empty" + (f" (prompt {i + 1})" if len(texts) > 1 else ""))
    generator = torch.Generator().manual_seed(a.seed)
    # All prompts decode as one batch (different lengths included): each greedy completion is the one
    # that prompt gets alone.
    outs = generate(model, prompts, a.max_new_tokens, a.temperature, a.top_k, generator)
    for i, out in enumerate(outs):
        if len(outs) > 1:
            print(f"=== completion {i + 1}/{len(outs)} ===")
        print(tokenizer.decode(out.tolist()))
