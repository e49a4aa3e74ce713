"""Decoding prompts of different lengths as one batch, and the fixed-shape (CUDA-graph) step, on the CPU."""

import warnings

import pytest
import torch
from test_decode_protocol import static_decode as decode_on_static_states

from spectralds.generate import (
    _clone,
    _leaves,
    generate,
    graphable,
    merge_prefills,
    prefill_prompts,
    set_decode_method,
    static_states,
)
from spectralds.layers.kv_cache import KVCache, RingKVCache
from spectralds.models import LanguageModel

LENGTHS = (3, 9, 1, 6)  # the window (4) is shorter than some prompts and longer than others


def tiny_lm(pattern, window: int | None = 4, decode: str | None = None) -> LanguageModel:
    torch.manual_seed(0)
    model = LanguageModel(
        vocab_size=32, dim=16, num_layers=len(pattern), layer_pattern=list(pattern), seq_len=40,
        num_filters=4,
        layer_kwargs={"attn": {"num_heads": 2, "window_size": window}, "lds": {"state_dim": 8},
                      "lds_ar": {"state_dim": 8, "ar_order": 2}},
    ).eval()
    if decode:
        set_decode_method(model, decode)
    return model


def prompts(lengths=LENGTHS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 32, (n,), generator=g) for n in lengths]


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


CASES = [
    (("stu",), None, "naive"), (("stu",), None, "futurefill"), (("stu_t",), None, "futurefill"),
    (("lds",), None, None), (("attn",), None, None), (("attn",), 4, None), (("attn",), 30, None),
    (("stu", "attn"), 4, "futurefill"), (("lds", "attn"), 4, None), (("stu_t", "attn", "lds"), None, "naive"),
    (("lds_ar", "attn"), 4, None),
]


@pytest.mark.parametrize("pattern, window, decode", CASES)
def test_batched_prompts_decode_as_each_alone(pattern, window, decode):
    model = tiny_lm(pattern, window, decode)
    batch = prompts()
    out = generate(model, batch, 14)
    alone = [generate(model, p[None], 14)[0] for p in batch]
    assert [o.shape[0] for o in out] == [n + 14 for n in LENGTHS]
    assert all(torch.equal(a, b) for a, b in zip(out, alone, strict=True))  # greedy: token-identical
    # The logits too, step by step, fed the same tokens: batched vs each prompt alone.
    with torch.inference_mode():
        logits, states = prefill_prompts(model, batch)
        singles = [model.prefill(p[None]) for p in batch]
        for _ in range(10):
            expected = torch.cat([lg for lg, _ in singles])
            assert rel(logits, expected) < 1e-5
            token = expected.argmax(-1)
            logits, states = model.step(token, states)
            singles = [model.step(token[i : i + 1], s) for i, (_, s) in enumerate(singles)]


@pytest.mark.parametrize("pattern, window, decode", CASES)
def test_merged_prefills_decode_as_each_alone(pattern, window, decode):
    """`merge_prefills` (each layer's `merge_states`): two left-padded batches prefilled apart, then one."""
    model = tiny_lm(pattern, window, decode)
    batch = prompts()
    with torch.inference_mode():
        parts = [prefill_prompts(model, batch[:2]), prefill_prompts(model, batch[2:])]
        logits, states = torch.cat([lg for lg, _ in parts]), merge_prefills(model, [s for _, s in parts])
        singles = [model.prefill(p[None]) for p in batch]
        for _ in range(8):
            expected = torch.cat([lg for lg, _ in singles])
            assert rel(logits, expected) < 1e-5
            token = expected.argmax(-1)
            logits, states = model.step(token, states)
            singles = [model.step(token[i : i + 1], s) for i, (_, s) in enumerate(singles)]


def test_prompts_take_one_prefill():
    model = tiny_lm(("stu", "attn"))
    calls = []
    original = model.prefill
    model.prefill = lambda idx, start=None: calls.append((idx.shape, start)) or original(idx, start)
    batch = prompts((5, 5, 5))
    out = generate(model, batch, 3)
    assert calls == [((3, 5), None)] and torch.equal(torch.stack(out), generate(model, torch.stack(batch), 3))
    del calls[:]
    generate(model, prompts((5, 2)), 3)
    [(shape, start)] = calls  # different lengths: one prefill, left-padded to the longest
    assert shape == (2, 5) and start.tolist() == [0, 3]


def test_bad_prompt_lists_are_clear_errors():
    model = tiny_lm(("lds",))
    for bad in ([], [torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)], [torch.zeros(2, 3).long()]):
        with pytest.raises(ValueError, match="non-empty 1-D"):
            generate(model, bad, 2)
    with pytest.raises(ValueError, match="prompt \\(39 tokens\\) \\+ 2 new tokens exceeds"):
        generate(model, [torch.zeros(3).long(), torch.zeros(39).long()], 2)


def static_decode(model, batch, new_tokens: int):
    """Greedy decoding of prompts on the fixed-shape states, every step writing into the same tensors."""
    logits, states = prefill_prompts(model, batch)
    return decode_on_static_states(model, states, logits, new_tokens)


@pytest.mark.parametrize("lengths", [LENGTHS, (6, 6)])
@pytest.mark.parametrize("pattern", [("lds", "attn"), ("attn",), ("lds_ar", "attn")])
def test_fixed_shape_step_equals_eager_decoding(pattern, lengths):
    model = tiny_lm(pattern, window=4)
    batch = prompts(lengths)
    with torch.inference_mode():
        logits, states = prefill_prompts(model, batch)
        assert any(isinstance(s, KVCache) for s in states)
        static = static_decode(model, batch, 12)
        assert any(isinstance(s, RingKVCache) for s in static_states(model, states))
        eager = []
        for _ in range(12):
            eager.append(logits)
            logits, states = model.step(logits.argmax(-1), states)
    assert rel(static, torch.stack(eager)) < 1e-6
    assert torch.equal(static.argmax(-1), torch.stack(eager).argmax(-1))


def test_fixed_shape_step_has_no_position_baked_in():
    """Trace the step once (as a CUDA graph records it) and replay it past the ring's wrap: a Python
    number depending on the position would be frozen into the trace and the replay would go wrong."""
    model = tiny_lm(("lds", "attn"), window=4).requires_grad_(False)
    with torch.no_grad():
        logits, states = prefill_prompts(model, prompts())
        states = static_states(model, states)
        kinds = [type(s) for s in states]

        def flat_step(token, *leaves):
            it = iter(leaves)
            rebuilt = [next(it) if kind is torch.Tensor else kind(*(next(it) for _ in kind._fields))
                       for kind in kinds]
            logits, new = model.step(token, rebuilt)
            return (logits, *_leaves(new))

        token = logits.argmax(-1)
        tracer = torch.jit.TracerWarning
        with warnings.catch_warnings():  # a position read on the host shows up as one of these warnings
            warnings.filterwarnings("error", message=".*(Python|constant)", category=tracer)
            warnings.filterwarnings("ignore", message="Iterating over a tensor", category=tracer)
            traced = torch.jit.trace(flat_step, (token, *_clone(_leaves(states))), check_trace=False)
        replayed = _clone(_leaves(states))
        for _ in range(12):
            expected, states = model.step(token, states)
            actual, *replayed = traced(token, *replayed)
            assert rel(actual, expected) < 1e-6
            token = expected.argmax(-1)


@pytest.mark.parametrize("pattern, match", [(("attn",), "full attention"), (("stu",), "STU"),
                                            (("lds", "stu_t"), "STUTensordot")])
def test_what_cannot_have_fixed_shapes_says_why(pattern, match):
    model = tiny_lm(pattern, window=None)
    with torch.inference_mode():
        states = model.prefill(torch.zeros(1, 5, dtype=torch.long))[1]
    with pytest.raises(ValueError, match=f"fixed-size states.*{match}.*grows"):
        static_states(model, states)


@pytest.mark.parametrize("pattern, window, expected", [(("lds", "attn"), 4, True), (("attn",), 8, True),
                                                       (("lds",), None, True), (("lds", "attn"), None, False),
                                                       (("lds_ar", "attn"), 4, True),
                                                       (("stu", "attn"), 4, False)])
def test_generate_records_a_graph_for_fixed_shape_models_only(pattern, window, expected):
    """generate's default (cuda_graph=None) graphs exactly the models `graphable` accepts (on a GPU)."""
    model = tiny_lm(pattern, window)
    with torch.inference_mode():
        states = model.prefill(torch.zeros(2, 5, dtype=torch.long))[1]
    assert graphable(model, states) is expected
    with pytest.raises(ValueError, match="CUDA"):  # asked for on a CPU: the device is the first problem
        generate(model, torch.zeros(2, 5, dtype=torch.long), 3, cuda_graph=True)
