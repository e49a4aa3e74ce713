"""A prefill that continues from a state (`SequenceLayer.prefill(x, state=...)`), every layer kind, float64:
a prompt cut into chunks anywhere (1-4 chunks, length-1 ones included, `step` calls between them) gives
the outputs of one prefill over the whole, and the states after both give the same later steps and merge
(`merge_states`) into batches that decode as each row alone."""

import random

import pytest
import torch
from test_left_padding import fitted_lds, with_ar

from spectralds.errors import UserError
from spectralds.generate import merge_prefills, static_states
from spectralds.layers import SequenceLayer, attention_continue, build_layer, futurefill
from spectralds.layers.kv_cache import RingKVCache

F64 = torch.float64
DIM, SEQ, TOL = 8, 48, 1e-10
SPECTRAL = {"seq_len": SEQ, "num_filters": 3}


def stu(name: str, method: str, **kwargs):
    layer = build_layer(name, dim=DIM, **SPECTRAL, **kwargs).double()
    layer.set_decode_method(method)
    return with_ar(layer) if kwargs.get("ar_order") else layer


class EMA(SequenceLayer):
    """A layer with only init_state / step: it continues through the registry's default prefill."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Linear(DIM, DIM, bias=False).double()

    def init_state(self, batch_size, device=None, dtype=None):
        return torch.zeros(batch_size, DIM, device=device, dtype=dtype)

    def step(self, x_t, state):
        state = 0.8 * state + self.w(x_t)
        return state.tanh(), state


LAYERS = {
    **{f"{name}_{method}": (lambda name=name, method=method: stu(name, method))
       for name in ("stu", "stu_t") for method in ("futurefill", "naive")},
    **{f"stu_ar_{method}": (lambda method=method: stu("stu", method, ar_order=2))
       for method in ("futurefill", "naive")},
    "stu_t_ar_naive": lambda: stu("stu_t", "naive", ar_order=3),
    "lds_scan": lambda: fitted_lds(state_dim=6, chunk_size=4, conv_path="scan"),
    "lds_conv": lambda: fitted_lds(state_dim=6, conv_path="conv"),
    "lds_tensordot_scan": lambda: fitted_lds(state_dim=6, mode="tensordot", chunk_size=4, conv_path="scan"),
    "lds_tensordot_conv": lambda: fitted_lds(state_dim=6, mode="tensordot", conv_path="conv"),
    "lds_learnable": lambda: build_layer("lds", dim=DIM, state_dim=6, dtype="float64", chunk_size=4,
                                         **SPECTRAL),
    "lds_ar": lambda: with_ar(build_layer("lds_ar", dim=DIM, state_dim=6, dtype="float64", ar_order=3,
                                          chunk_size=4, **SPECTRAL)),
    "lds_ar_tensordot": lambda: with_ar(build_layer("lds_ar", dim=DIM, state_dim=6, dtype="float64",
                                                    mode="tensordot", ar_order=2, **SPECTRAL)),
    "attn": lambda: build_layer("attn", dim=DIM, num_heads=2).double(),
    "attn_window": lambda: build_layer("attn", dim=DIM, num_heads=2, window_size=5).double(),
    "attn_softcap_window": lambda: build_layer("attn", dim=DIM, num_heads=2, window_size=4,
                                               softcap=5.0).double(),
    "attn_alibi_window": lambda: build_layer("attn", dim=DIM, num_heads=2, window_size=4, positions="alibi",
                                             alibi_slope_scale=0.25).double(),
    "attn_no_positions": lambda: build_layer("attn", dim=DIM, num_heads=2, positions="none").double(),
    "default_ema": EMA,
}


def inputs(length: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, length, DIM, generator=torch.Generator().manual_seed(seed), dtype=F64)


def random_plan(rng: random.Random, length: int) -> list[tuple[str, int]]:
    """1-4 prefill chunks covering `length` inputs, cut anywhere (length-1 chunks likely), some with
    `step` calls before them; the first is always a prefill."""
    cuts = sorted(rng.sample(range(1, length), rng.randint(0, 3)))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, length], strict=True)]
    plan = [("prefill", sizes[0])]
    for size in sizes[1:]:
        steps = rng.randint(1, size - 1) if size > 1 and rng.random() < 0.5 else 0
        plan += [("step", steps), ("prefill", size - steps)] if steps else [("prefill", size)]
    return plan


def run_plan(layer, x: torch.Tensor, plan) -> tuple[torch.Tensor, object]:
    """Outputs for x fed as `plan` says (prefills from the state so far, single steps) and the state."""
    state, ys, t = None, [], 0
    for kind, n in plan:
        if kind == "step":
            for _ in range(n):
                y, state = layer.step(x[:, t], state)
                ys.append(y[:, None])
                t += 1
        else:
            y, state = layer.prefill(x[:, t : t + n]) if state is None else layer.prefill(x[:, t : t + n],
                                                                                            state=state)
            ys.append(y)
            t += n
    assert t == x.shape[1]
    return torch.cat(ys, 1), state


def later_steps(layer, state, steps: int = 5, batch: int = 2, rows: slice = slice(None)) -> torch.Tensor:
    """Outputs of `steps` steps from `state` on fixed inputs (`rows` of a batch of `batch`)."""
    x = inputs(steps, batch, seed=7)[rows]
    out = []
    for t in range(steps):
        y, state = layer.step(x[:, t], state)
        out.append(y)
    return torch.stack(out, 1)


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_chunks_anywhere_equal_one_prefill_and_the_steps_after(kind):
    layer = LAYERS[kind]().eval()
    rng = random.Random(kind)
    length = 29
    x = inputs(length)
    with torch.no_grad():
        whole, reference = layer.prefill(x)
        expected_after = later_steps(layer, reference)
        plans = [[("prefill", 1)] * length, [("prefill", length - 1), ("prefill", 1)],
                 [("prefill", 3), ("step", 13), ("prefill", 13)],  # FutureFill owes several blocks
                 *(random_plan(rng, length) for _ in range(6))]
        for plan in plans:
            _, reference = layer.prefill(x)  # a step may write a state in place: a fresh one each time
            out, state = run_plan(layer, x, plan)
            assert_close(out, whole)
            assert_close(later_steps(layer, state), expected_after)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_a_continued_state_merges_into_a_batch_decoding_as_each_row(kind):
    """The multiple-choice pattern: one context state repeated (`merge_prefills`), then a batch of
    continuations from it, each row equal to its continuation alone."""
    layer = LAYERS[kind]().eval()
    context, choices = inputs(11, batch=1), inputs(6, batch=3, seed=3)
    with torch.no_grad():
        _, state = layer.prefill(context[:, :4])
        _, state = layer.prefill(context[:, 4:], state=state)
        merged = merge_prefills(layer, [state] * 3) if kind != "default_ema" else torch.cat([state] * 3)
        batched, after = layer.prefill(choices, state=merged)
        batched_steps = later_steps(layer, after, batch=3)
        for row in range(3):
            _, alone = layer.prefill(context)
            y, alone = layer.prefill(choices[row : row + 1], state=alone)
            assert_close(batched[row : row + 1], y)
            own = slice(row, row + 1)
            assert_close(batched_steps[own], later_steps(layer, alone, batch=3, rows=own))


@pytest.mark.parametrize("kind", sorted(set(LAYERS) - {"default_ema"}))
def test_continued_states_of_different_lengths_merge_right_aligned(kind):
    """Contexts of different lengths, each prefilled in two chunks, merged (right-aligned at the longest),
    then one more chunk for all: each row's outputs and later steps are its own run alone."""
    layer = LAYERS[kind]().eval()
    contexts = [inputs(n, batch=1, seed=n) for n in (13, 6, 9)]
    chunk = inputs(5, batch=3, seed=4)
    with torch.no_grad():
        states = []
        for x in contexts:
            _, state = layer.prefill(x[:, :3])
            states.append(layer.prefill(x[:, 3:], state=state)[1])
        y, merged = layer.prefill(chunk, state=merge_prefills(layer, states))
        steps = later_steps(layer, merged, batch=3)
        for row, x in enumerate(contexts):
            alone = torch.cat([x, chunk[row : row + 1]], 1)
            whole, state = layer.prefill(alone)
            own = slice(row, row + 1)
            assert_close(y[own], whole[:, -5:])
            assert_close(steps[own], later_steps(layer, state, batch=3, rows=own))


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_continuing_from_the_initial_state_is_a_first_prefill(kind):
    layer = LAYERS[kind]().eval()
    x = inputs(10)
    with torch.no_grad():
        whole, state = layer.prefill(x)
        y, continued = layer.prefill(x, state=layer.init_state(2, dtype=F64))
        assert_close(y, whole)
        assert_close(later_steps(layer, continued), later_steps(layer, state))


def test_futurefill_owes_exactly_the_pending_blocks():
    """After n generated tokens (n = 1..20) the next chunk's outputs are one prefill's: every (source,
    target) pair the dyadic schedule had not added yet is added once, none twice."""
    for name in ("stu", "stu_t"):
        layer = stu(name, "futurefill").eval()
        x = inputs(SEQ)
        with torch.no_grad():
            whole = layer.prefill(x)[0]
            for n in range(1, 21):
                out, _ = run_plan(layer, x[:, : 5 + n + 9], [("prefill", 5), ("step", n), ("prefill", 9)])
                assert_close(out, whole[:, : 5 + n + 9])


@pytest.mark.parametrize("kind", ["stu_futurefill", "stu_t_naive", "stu_naive", "stu_ar_futurefill", "attn",
                                  "attn_window", "attn_alibi_window"])
def test_pieces_and_query_blocks_change_nothing(kind, monkeypatch):
    """Long chunks run in pieces (FutureFill's targets, naive's history, attention's query blocks) so
    their memory follows the chunk: pieces of 3 give one prefill's outputs."""
    monkeypatch.setattr(futurefill, "_PIECE", 3)
    monkeypatch.setattr(attention_continue, "QUERY_BLOCK", 3)
    layer = LAYERS[kind]().eval()
    x = inputs(40)
    with torch.no_grad():
        whole, reference = layer.prefill(x)
        for plan in ([("prefill", 1), ("prefill", 17), ("step", 2), ("prefill", 20)],
                     [("prefill", 11), ("prefill", 2), ("prefill", 27)]):
            out, state = run_plan(layer, x, plan)
            assert_close(out, whole)
        assert_close(later_steps(layer, state), later_steps(layer, reference))


def test_a_ring_cache_continues_by_steps():
    layer = LAYERS["attn_window"]().eval()
    x = inputs(12)
    with torch.no_grad():
        whole = layer.prefill(x)[0]
        _, cache = layer.prefill(x[:, :7])
        ring = static_states(layer, cache)
        assert isinstance(ring, RingKVCache)
        y, ring = layer.prefill(x[:, 7:], state=ring)
    assert isinstance(ring, RingKVCache)
    assert_close(y, whole[:, 7:])


def test_a_left_padded_prefill_continues_with_each_row_its_own():
    """A first prefill with `start` (rows right-aligned), then a chunk: each row as if run alone."""
    for kind in ("attn_window", "attn_alibi_window", "stu_futurefill", "lds_scan"):
        layer = LAYERS[kind]().eval()
        x = inputs(10, batch=2)
        x[1, :4] = 0  # row 1 starts at 4 (the caller zeroes padding, as `Block` does)
        start = torch.tensor([0, 4])
        with torch.no_grad():
            _, state = layer.prefill(x[:, :6], start=start)
            y, state = layer.prefill(x[:, 6:], state=state)
            for row, s in enumerate(start.tolist()):
                alone = layer.prefill(x[row : row + 1, s:])[0]
                assert_close(y[row : row + 1], alone[:, -4:])


def one_line_error(call, match: str) -> None:
    with pytest.raises(UserError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_start_with_a_state_and_a_batch_mismatch_are_one_line_errors(kind):
    layer = LAYERS[kind]().eval()
    x = inputs(6)
    with torch.no_grad():
        _, state = layer.prefill(x[:, :3])
        one_line_error(lambda: layer.prefill(x[:, 3:], torch.tensor([0, 1]), state),
                       "start \\(left padding\\) is for a first prefill only")
        if kind != "default_ema":  # the default knows no state's batch (its step fails)
            one_line_error(lambda: layer.prefill(inputs(3, batch=3), state=state),
                           "the decoding state holds 2 sequences but the chunk continuing it has 3")


def test_the_positional_prefill_is_unchanged():
    """`prefill(x, start)` positional callers (the Block, older code) still pass left padding."""
    layer = LAYERS["attn_window"]().eval()
    x = inputs(5)
    with torch.no_grad():
        by_name = layer.prefill(x, start=torch.tensor([0, 2]))[0]
        positional = layer.prefill(x, torch.tensor([0, 2]))[0]
    assert torch.equal(by_name, positional)


def test_a_chunk_past_the_filters_is_refused():
    layer = LAYERS["stu_futurefill"]().eval()
    with torch.no_grad():
        _, state = layer.prefill(inputs(40))
        one_line_error(lambda: layer.prefill(inputs(9), state=state), "past seq_len=48")
