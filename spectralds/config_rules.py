"""The rules that complete a `spectralds fit|validate|test|predict` config: what a config does not write.

Two values are written once and follow from elsewhere:

- seq_len (`derive_seq_len`): where a config or the command line sets it for only one of model and data,
  the other follows. The model's is the data's longest sequence (training or validation), the data's is
  the model's. Not a jsonargparse link, which would also override a value that was written (lengthgen
  configs train at 128 and validate at 2048 with one 2048 model).
- the model's vocab_size (`VOCAB_SIZE_LINK`, computed by `tokenizer_vocab_size`): the data's tokenizer's
  token count, padded to a multiple of 64, unless written (`keep_written_vocab_size`: a padded vocabulary,
  say), and then never smaller than the tokenizer's count.

A config here is the parsed jsonargparse Namespace of one subcommand (`config["model.init_args"]`), and
"given" what the config files and the command line wrote, without defaults (`compat.parse_written`).
Models or data modules without these arguments are left as they are.
"""

from __future__ import annotations

from typing import Any

from spectralds.errors import UserError

# A parse link (jsonargparse `link_arguments`, not one on instantiation) from the data's tokenizer to the
# model's vocabulary: the model is still built before the data, so a config error in the model is
# reported first. (source keys, target key); its compute_fn is `tokenizer_vocab_size`.
VOCAB_SIZE_LINK = (
    ("data.init_args.tokenizer", "data.init_args.bpe_vocab_size"), "model.init_args.vocab_size"
)
VOCAB_MULTIPLE = 64  # the linked vocab_size is padded to a multiple of this (fast matmuls)


def tokenizer_token_count(tokenizer: str, bpe_vocab_size: int) -> int:
    """How many token ids TextDataModule's tokenizer for these arguments produces."""
    from spectralds.data import build_tokenizer

    return bpe_vocab_size if tokenizer == "bpe" else build_tokenizer(tokenizer).vocab_size


def tokenizer_vocab_size(tokenizer: str, bpe_vocab_size: int) -> int:
    """The model's vocab_size linked from the data: the token count padded to `VOCAB_MULTIPLE`."""
    return -(-tokenizer_token_count(tokenizer, bpe_vocab_size) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def derive_seq_len(config: Any, given: Any) -> None:
    """Fill in, in `config`, the seq_len of model or data that only the other one was given (see the
    module doc); nothing when both or neither were written."""
    model, data = config.get("model.init_args"), config.get("data.init_args")
    if model is None or data is None or "seq_len" not in model or "seq_len" not in data:
        return
    wrote_model = given.get("model.init_args.seq_len") is not None
    wrote_data = given.get("data.init_args.seq_len") is not None
    if wrote_data and not wrote_model:
        model.seq_len = max(data.seq_len, data.get("val_seq_len") or 0)
    elif wrote_model and not wrote_data:
        data.seq_len = model.seq_len


def keep_written_vocab_size(config: Any, given: Any) -> None:
    """A vocab_size the user wrote wins over the tokenizer link, but it must hold every token id: never
    replaced silently, never too small (a UserError)."""
    written = given.get("model.init_args.vocab_size")
    model = config.get("model.init_args")
    if written is None or model is None or "vocab_size" not in model:
        return
    data = config.get("data.init_args") or {}
    needed = model.vocab_size  # linked, padded; the tokenizer's own count when there is one:
    if "tokenizer" in data:  # a written size between the two is fine
        needed = tokenizer_token_count(data.tokenizer, data.get("bpe_vocab_size"))
    if written < needed:
        raise UserError(f"model vocab_size {written} is smaller than the tokenizer's {needed} tokens")
    model.vocab_size = written


SEED_RANGE = (0, 2**32 - 1)  # what seed_everything (numpy's generator) accepts


def check_seed(config: Any) -> None:
    """seed_everything within `SEED_RANGE`: Lightning refuses another value only once the run starts, with
    a traceback."""
    seed = config.get("seed_everything")
    if isinstance(seed, int) and not isinstance(seed, bool) and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise UserError(f"seed_everything must be between {SEED_RANGE[0]} and {SEED_RANGE[1]}, got {seed}")


def apply_written_rules(config: Any, given: Any) -> None:
    """The rules that depend on what the user wrote, not on the parser's defaults, in place; the seed's
    range checked."""
    derive_seq_len(config, given)
    keep_written_vocab_size(config, given)
    check_seed(config)
