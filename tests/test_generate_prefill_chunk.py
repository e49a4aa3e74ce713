"""`generate(..., prefill_chunk=n)`: a long prompt prefilled n tokens at a time gives the tokens of one
prefill (greedy, float64, every kind of model), for one batch and for prompts of different lengths."""

import pytest
import torch
from lm_helpers import float64_lm

from spectralds.errors import UserError
from spectralds.generate import chunked_prefill, generate, prefill_prompts
from spectralds.models import LanguageModel

MODELS = [("stu", "attn"), ("lds",), ("stu_t", "lds_ar"), ("attn", "attn"), ("lds", "attn", "stu")]


def tiny_lm(pattern, decode: str = "futurefill") -> LanguageModel:
    return float64_lm(pattern, decode, seq_len=64, window=5)


def ids(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 32, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("decode", ["futurefill", "naive"])
@pytest.mark.parametrize("pattern", MODELS)
def test_chunked_prefill_generates_the_same_tokens(pattern, decode):
    model = tiny_lm(pattern, decode)
    prompt = ids(2, 37)
    expected = generate(model, prompt, 12)
    for chunk in (1, 5, 16, 36, 37, 100):
        assert torch.equal(generate(model, prompt, 12, prefill_chunk=chunk), expected)
    ragged = [ids(23, seed=1), ids(4, seed=2), ids(31, seed=3)]
    alone = generate(model, ragged, 10)
    for chunk in (3, 8, 30):
        out = generate(model, ragged, 10, prefill_chunk=chunk)
        assert all(torch.equal(a, b) for a, b in zip(out, alone, strict=True))


def test_chunked_prefill_is_one_prefill():
    model = tiny_lm(("stu", "attn"))
    prompt = ids(3, 29)
    with torch.inference_mode():
        logits, states = model.prefill(prompt)
        chunked, chunked_states = chunked_prefill(model, prompt, 6)
        assert (chunked - logits).abs().max() < 1e-10
        token = logits.argmax(-1)
        assert (model.step(token, chunked_states)[0] - model.step(token, states)[0]).abs().max() < 1e-10
        padded, _ = prefill_prompts(model, [ids(29, seed=1), ids(9, seed=2)])
        chunks, _ = prefill_prompts(model, [ids(29, seed=1), ids(9, seed=2)], prefill_chunk=4)
        assert (chunks - padded).abs().max() < 1e-10


def test_prefill_chunk_errors_are_one_line():
    model = tiny_lm(("stu",))

    class NoStates:
        seq_len = 64

        def prefill(self, idx, start=None):
            return model.prefill(idx, start)

        def step(self, token, states):
            return model.step(token, states)

        def decoding_layers(self):
            return model.decoding_layers()

    for call, match in [
        (lambda: generate(model, ids(1, 9), 2, prefill_chunk=0), "prefill_chunk must be >= 1, got 0"),
        (lambda: generate(model, ids(1, 9), 2, prefill_chunk=2.5), "prefill_chunk must be an integer"),
        (lambda: generate(NoStates(), ids(1, 9), 2, prefill_chunk=4),
         r"NoStates.prefill\(idx\) takes no `states`"),
    ]:
        with pytest.raises(UserError, match=match) as info:
            call()
        assert "\n" not in str(info.value)
    # a prompt within one chunk needs no continuation: a model without `states` still generates
    assert torch.equal(generate(NoStates(), ids(1, 9), 2, prefill_chunk=9), generate(model, ids(1, 9), 2))
