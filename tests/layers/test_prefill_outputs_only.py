"""A continuation's outputs only (`prefill(x, state=..., keep_state=False)`), every layer kind, float64: the
outputs equal those of the state-keeping continuation to 1e-10 (after a prefill, after decoding steps), the
state it skips comes back None, and a layer that `continues_repeated()` takes a chunk of n times the
state's batch, row r continuing state row r % B, as if each block of B rows continued the state alone."""

import copy

import pytest
import torch
from test_prefill_continue import LAYERS, TOL, inputs

from spectralds.errors import UserError
from spectralds.layers.blocks import continued_prefill
from spectralds.models import LanguageModel

REPEATING = {"stu_futurefill", "stu_naive", "stu_t_futurefill", "stu_t_naive", "lds_scan", "lds_conv",
             "lds_tensordot_scan", "lds_tensordot_conv", "lds_learnable", "attn", "attn_window",
             "attn_softcap_window", "attn_alibi_window", "attn_no_positions"}


def context_state(layer, steps: int):
    """The state after a 9-token prefill and `steps` decoding steps (batch 2)."""
    torch.manual_seed(0)
    _, state = layer.prefill(inputs(9, seed=3))
    for t in range(steps):
        _, state = layer.step(inputs(1, seed=10 + t)[:, 0], state)
    return state


@pytest.mark.parametrize("steps", [0, 3])
@pytest.mark.parametrize("name", sorted(LAYERS))
@torch.no_grad()
def test_outputs_only_equal_the_state_keeping_continuation(name, steps):
    layer = LAYERS[name]()
    state = context_state(layer, steps)
    chunk = inputs(7, seed=5)
    kept, after = continued_prefill(layer, chunk, copy.deepcopy(state), keep_state=True)
    only, skipped = continued_prefill(layer, chunk, copy.deepcopy(state), keep_state=False)
    assert after is not None
    assert (skipped is None) == (name in REPEATING)  # layers without the fast path keep their state
    torch.testing.assert_close(only, kept, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("steps", [0, 2])
@pytest.mark.parametrize("name", sorted(REPEATING))
@torch.no_grad()
def test_a_chunk_of_n_times_the_batch_continues_each_row_of_the_state(name, steps):
    layer = LAYERS[name]()
    assert layer.continues_repeated()
    state = context_state(layer, steps)
    chunks = inputs(6, batch=6, seed=7)  # 3 continuations of each of the state's 2 rows
    before = copy.deepcopy(state)
    y, skipped = layer.prefill(chunks, state=state, keep_state=False)
    assert skipped is None and y.shape[0] == 6
    for k in range(3):
        alone, _ = layer.prefill(chunks[2 * k : 2 * k + 2], state=copy.deepcopy(before), keep_state=True)
        torch.testing.assert_close(y[2 * k : 2 * k + 2], alone, rtol=TOL, atol=TOL)
    with pytest.raises(UserError, match="holds 2 sequences but the chunk continuing it has 5"):
        layer.prefill(inputs(6, batch=5), state=state, keep_state=False)
    with pytest.raises(UserError, match="holds 2 sequences but the chunk continuing it has 4"):
        layer.prefill(inputs(6, batch=4), state=state, keep_state=True)  # a state to keep: one row each


@pytest.mark.parametrize("name", sorted(set(LAYERS) - REPEATING))
def test_layers_that_keep_their_state_do_not_repeat_it(name):
    assert not LAYERS[name]().continues_repeated()


@pytest.mark.parametrize("pattern", [["stu_t"], ["lds"], ["stu_t", "attn"], ["stu"]])
@torch.no_grad()
def test_a_model_continues_one_context_per_row_group_without_states(pattern):
    torch.manual_seed(0)
    kwargs = {"lds": {"state_dim": 8, "dtype": "float64"}, "attn": {"num_heads": 2, "window_size": 12}}
    model = LanguageModel(vocab_size=32, dim=16, num_layers=2, layer_pattern=pattern, seq_len=64,
                          num_filters=4, layer_kwargs=kwargs).double()
    context = torch.randint(0, 32, (2, 20))
    endings = torch.randint(0, 32, (6, 5))
    _, states = model.prefill(context)
    logits, skipped = model.prefill(endings, states=states, all_logits=True, keep_state=False)
    assert skipped == [None, None]
    full = model(torch.cat([context.repeat(3, 1), endings], 1))[:, 20:]
    torch.testing.assert_close(logits, full, rtol=1e-9, atol=1e-9)
