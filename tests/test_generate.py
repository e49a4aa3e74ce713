"""spectralds.generate: the one decode loop, generate against a hand-written loop, the decode protocol."""

import pytest
import torch

from spectralds.generate import decode_loop, generate, sample_next, set_decode_method
from spectralds.layers import SequenceLayer, build_layer
from spectralds.layers.registry import DECODE_METHODS
from spectralds.models import LanguageModel


def tiny_lm(pattern) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(
        vocab_size=32, dim=16, num_layers=2, layer_pattern=list(pattern), seq_len=32, num_filters=4,
        layer_kwargs={"attn": {"num_heads": 2, "window_size": 8}},
    ).eval()


def test_decode_loop_feeds_choices_and_threads_the_state():
    calls = []

    def step(x, state):
        calls.append((x, state))
        return x * 10, state + 1

    out, state = decode_loop(step, 7, 100, 3, lambda i, out: out + i)
    assert calls == [(7, 100), (71, 101), (712, 102)]  # x_i = choose(i, previous output)
    assert (out, state) == (7120, 103)
    assert decode_loop(step, "untouched", "state", 0, lambda i, out: 1 / 0) == ("untouched", "state")


def reference_generate(model, prompt, new_tokens, temperature, top_k, generator):
    """The loop generate replaced, written out: sample, append, step (not after the last token)."""
    with torch.inference_mode():
        logits, states = model.prefill(prompt)
        out = [prompt]
        for i in range(new_tokens):
            token = sample_next(logits, temperature, top_k, generator)
            out.append(token[:, None])
            if i + 1 < new_tokens:
                logits, states = model.step(token, states)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("pattern", [("stu",), ("stu_t", "attn"), ("lds",)])
@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (0.8, 5)])
def test_generate_matches_the_hand_written_loop(pattern, temperature, top_k):
    model = tiny_lm(pattern)
    prompt = torch.randint(0, 32, (2, 6))
    for new_tokens in (0, 1, 2, 13):
        args = (model, prompt, new_tokens, temperature, top_k)
        got = generate(*args, torch.Generator().manual_seed(3))
        expected = reference_generate(*args, torch.Generator().manual_seed(3))
        assert got.shape == (2, 6 + new_tokens) and torch.equal(got, expected)


def test_generate_steps_once_per_token_but_the_last():
    model = tiny_lm(("stu",))
    calls = []
    original = model.step
    model.step = lambda token, states: calls.append(token) or original(token, states)
    out = generate(model, torch.randint(0, 32, (1, 4)), 5)
    assert len(calls) == 4
    assert all(torch.equal(token, out[:, 4 + i]) for i, token in enumerate(calls))


def test_cuda_graph_request_on_cpu_is_a_clear_error():
    model = tiny_lm(("lds",))
    with pytest.raises(ValueError, match="CUDA"):
        generate(model, torch.randint(0, 32, (1, 4)), 3, cuda_graph=True)


class _Other(SequenceLayer):
    """A layer with one way to decode, and a non-layer module with a `decode` attribute: both untouched."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Module()
        self.inner.decode = "naive"


def test_set_decode_method_finds_layers_by_type():
    stu = build_layer("stu", dim=2, seq_len=8, num_filters=2)
    stu_t = build_layer("stu_t", dim=2, seq_len=8, num_filters=2)
    model = torch.nn.ModuleList([stu, stu_t, _Other(), build_layer("attn", dim=4, num_heads=1)])
    assert stu.decode_method == stu_t.decode_method == "futurefill"
    assert set_decode_method(model, "naive") == 2
    assert stu.decode_method == stu_t.decode_method == "naive"
    assert stu.init_state(1).method == "naive"
    assert model[2].decode_method is None and model[2].inner.decode == "naive"
    with pytest.raises(ValueError, match="unknown decode method"):
        set_decode_method(model, "fastest")
    with pytest.raises(ValueError, match="decode method"):
        model[3].set_decode_method("naive")  # attention has one way to decode
    assert set(stu.decode_methods) == set(DECODE_METHODS)
