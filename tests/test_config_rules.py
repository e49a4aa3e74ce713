"""spectralds.config_rules: what completes a fit config, on parsed configs (no parser, no model built).
tests/test_cli.py checks the same rules through `spectralds fit`."""

import pytest
from jsonargparse import Namespace

from spectralds.config_rules import (
    apply_written_rules,
    derive_seq_len,
    keep_written_vocab_size,
    tokenizer_token_count,
    tokenizer_vocab_size,
)
from spectralds.errors import UserError


def config(model: dict, data: dict) -> Namespace:
    sections = {"model": model, "data": data}
    return Namespace(**{key: Namespace(init_args=Namespace(**args)) for key, args in sections.items()})


def written(model: dict | None = None, data: dict | None = None) -> Namespace:
    return config(model or {}, data or {})


@pytest.mark.parametrize(
    "model_len, data_len, val_len, expected",
    [
        (None, 48, None, (48, 48)),  # the model takes the data's length
        (None, 48, 96, (96, 48)),  # ... its longest: validation included
        (64, None, None, (64, 64)),  # the data takes the model's
        (64, 48, None, (64, 48)),  # both written: both stay
        (None, None, None, (256, 128)),  # neither: the defaults stay
    ],
)
def test_seq_len_is_written_once(model_len, data_len, val_len, expected):
    parsed = config({"seq_len": model_len or 256}, {"seq_len": data_len or 128, "val_seq_len": val_len})
    given = written({"seq_len": model_len} if model_len else {}, {"seq_len": data_len} if data_len else {})
    derive_seq_len(parsed, given)
    assert (parsed.model.init_args.seq_len, parsed.data.init_args.seq_len) == expected


def test_seq_len_rule_leaves_modules_without_seq_len_alone():
    parsed = config({"dim": 16}, {"seq_len": 48})
    derive_seq_len(parsed, written(data={"seq_len": 48}))
    assert "seq_len" not in parsed.model.init_args


def test_linked_vocab_size_is_the_token_count_padded_to_64():
    assert tokenizer_token_count("byte", 0) == 256 and tokenizer_vocab_size("byte", 0) == 256
    assert tokenizer_token_count("bpe", 300) == 300 and tokenizer_vocab_size("bpe", 300) == 320
    assert tokenizer_vocab_size("bpe", 320) == 320


@pytest.mark.parametrize("vocab_size, kept", [(300, 300), (301, 301), (384, 384)])
def test_a_written_vocab_size_wins_when_it_holds_every_token(vocab_size, kept):
    parsed = config({"vocab_size": 320}, {"tokenizer": "bpe", "bpe_vocab_size": 300})
    keep_written_vocab_size(parsed, written({"vocab_size": vocab_size}))
    assert parsed.model.init_args.vocab_size == kept


def test_a_written_vocab_size_smaller_than_the_tokenizer_is_refused():
    parsed = config({"vocab_size": 320}, {"tokenizer": "bpe", "bpe_vocab_size": 300})
    with pytest.raises(UserError, match="vocab_size 299 is smaller than the tokenizer's 300 tokens"):
        keep_written_vocab_size(parsed, written({"vocab_size": 299}))


def test_unwritten_vocab_size_keeps_the_link():
    data = {"tokenizer": "bpe", "bpe_vocab_size": 300, "seq_len": 32}
    parsed = config({"vocab_size": 320, "seq_len": 64}, data)
    apply_written_rules(parsed, written(data={"seq_len": 32}))
    assert parsed.model.init_args.vocab_size == 320 and parsed.model.init_args.seq_len == 32
