"""Left padding (`start`): every layer kind and a hybrid LanguageModel, in float64. A left-padded row's real
positions equal its unpadded run in forward, prefill and the steps after it; padded tokens change nothing."""

import pytest
import torch

from spectralds.generate import generate, left_pad, merge_prefills, prefill_prompts
from spectralds.layers import build_layer
from spectralds.models import LanguageModel

F64 = torch.float64
LENGTHS = (9, 5, 2)  # rows of one padded batch of 9: start = 0, 4, 7
DIM, SEQ = 8, 32


def fitted_lds(**kwargs):
    layer = build_layer("lds", dim=DIM, learnable=False, dtype="float64", **SPECTRAL, **kwargs)
    g = torch.Generator().manual_seed(0)
    A = (torch.rand(6, generator=g, dtype=F64) * 1.8 - 0.9)
    layer.set_system(A, torch.randn(6, generator=g, dtype=F64), torch.randn(6, 6, generator=g, dtype=F64))
    return layer


def with_ar(layer):
    """Random AR weights (they start at zero, which would make the AR terms do nothing)."""
    with torch.no_grad():
        for p in (layer.ar.M_u, layer.ar.M_y):
            p.copy_(torch.randn_like(p) * 0.2)
    return layer


SPECTRAL = {"seq_len": SEQ, "num_filters": 3}
LAYERS = {
    "stu": lambda: build_layer("stu", dim=DIM, **SPECTRAL).double(),
    "stu_t": lambda: build_layer("stu_t", dim=DIM, **SPECTRAL).double(),
    "stu_ar": lambda: with_ar(build_layer("stu", dim=DIM, ar_order=2, **SPECTRAL).double()),
    "lds_fitted": lambda: fitted_lds(state_dim=6, chunk_size=4),
    "lds_fitted_tensordot": lambda: fitted_lds(state_dim=6, mode="tensordot"),
    "lds_learnable": lambda: build_layer("lds", dim=DIM, state_dim=6, dtype="float64", chunk_size=4,
                                         **SPECTRAL),
    "lds_ar": lambda: with_ar(build_layer("lds_ar", dim=DIM, state_dim=6, dtype="float64", ar_order=3,
                                          **SPECTRAL)),
    "attn": lambda: build_layer("attn", dim=DIM, num_heads=2).double(),
    "attn_window": lambda: build_layer("attn", dim=DIM, num_heads=2, window_size=3).double(),
    "attn_softcap_window": lambda: build_layer("attn", dim=DIM, num_heads=2, window_size=4,
                                               softcap=5.0).double(),
    "attn_alibi": lambda: build_layer("attn", dim=DIM, num_heads=2, positions="alibi").double(),
    "attn_alibi_softcap_window": lambda: build_layer("attn", dim=DIM, num_heads=2, window_size=4, softcap=5.0,
                                                     positions="alibi", alibi_slope_scale=0.25).double(),
    "attn_no_positions": lambda: build_layer("attn", dim=DIM, num_heads=2, positions="none").double(),
}


def padded_inputs(garbage: bool = False):
    """Rows of LENGTHS real inputs right-aligned in one (3, 9, DIM) batch; padding zero (as `Block` leaves
    it) or, with garbage, random."""
    g = torch.Generator().manual_seed(1)
    rows = [torch.randn(n, DIM, generator=g, dtype=F64) for n in LENGTHS]
    T = max(LENGTHS)
    start = torch.tensor([T - n for n in LENGTHS])
    x = torch.randn(len(rows), T, DIM, generator=g, dtype=F64) if garbage else torch.zeros(len(rows), T, DIM,
                                                                                              dtype=F64)
    for b, row in enumerate(rows):
        x[b, start[b] :] = row
    return rows, x, start


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_each_layer_kind_runs_each_padded_row_as_its_own(kind):
    torch.manual_seed(0)
    layer = LAYERS[kind]().eval()
    rows, x, start = padded_inputs()
    steps = torch.randn(4, len(rows), DIM, dtype=F64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = layer(x, start=start)
        y_pre, state = layer.prefill(x, start=start)
        stepped = []
        for x_t in steps:
            y_t, state = layer.step(x_t, state)
            stepped.append(y_t)
        for b, row in enumerate(rows):
            alone = layer(row[None])[0]
            torch.testing.assert_close(y[b, start[b] :], alone, rtol=1e-10, atol=1e-12)
            alone_pre, alone_state = layer.prefill(row[None])
            torch.testing.assert_close(y_pre[b, start[b] :], alone_pre[0], rtol=1e-10, atol=1e-12)
            for x_t, y_t in zip(steps, stepped, strict=True):  # decoding continues each row's own run
                alone_t, alone_state = layer.step(x_t[b : b + 1], alone_state)
                torch.testing.assert_close(y_t[b], alone_t[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["attn", "attn_window", "attn_softcap_window", "attn_alibi",
                                  "attn_alibi_softcap_window", "attn_no_positions"])
def test_attention_never_reads_padded_keys(kind):
    """Attention is the one layer that must mask: whatever sits at the padded positions, real outputs and
    the steps after the prefill are unchanged (bit for bit: the padded keys' weights are exactly zero)."""
    torch.manual_seed(0)
    layer = LAYERS[kind]().eval()
    _, zeros, start = padded_inputs()
    _, garbage, _ = padded_inputs(garbage=True)
    real = torch.arange(zeros.shape[1]) >= start[:, None]
    x_t = torch.randn(3, DIM, dtype=F64)
    with torch.no_grad():
        outs = []
        for x in (zeros, garbage):
            y, state = layer.prefill(x, start=start)
            assert torch.equal(layer(x, start=start)[real], y[real])
            outs.append((y[real], layer.step(x_t, state)[0]))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert torch.isfinite(y).all()  # padded queries attend among themselves: no empty softmax


def hybrid_lm() -> LanguageModel:
    torch.manual_seed(0)
    model = LanguageModel(
        vocab_size=32, dim=16, num_layers=5, layer_pattern=["stu", "attn", "lds", "stu_t", "lds_ar"],
        seq_len=40, num_filters=3, mlp_ratio=2.0,
        layer_kwargs={"attn": {"num_heads": 2, "window_size": 4}, "stu": {"ar_order": 2},
                      "lds": {"state_dim": 8, "chunk_size": 4, "dtype": "float64"},
                      "lds_ar": {"state_dim": 8, "ar_order": 2, "dtype": "float64"}},
    ).double().eval()
    with_ar(model.blocks[0].mixer)
    with_ar(model.blocks[4].mixer)
    return model


def token_prompts() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(1, 32, (n,), generator=g) for n in (7, 3, 1, 6)]


def test_a_hybrid_language_model_runs_each_padded_row_as_its_own():
    model = hybrid_lm()
    prompts = token_prompts()
    idx, start = left_pad(prompts)
    other = idx.clone()
    other[torch.arange(idx.shape[1]) < start[:, None]] = 17  # other padded tokens: nothing may change
    with torch.inference_mode():
        logits = model(idx, start=start)
        last, states = model.prefill(idx, start=start)
        last_other, states_other = model.prefill(other, start=start)
        for b, prompt in enumerate(prompts):
            alone = model(prompt[None])[0]
            torch.testing.assert_close(logits[b, start[b] :], alone, rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(last[b], model.prefill(prompt[None])[0][0], rtol=1e-9, atol=1e-10)
        real = torch.arange(idx.shape[1]) >= start[:, None]
        assert torch.equal(model(other, start=start)[real], logits[real])
        assert torch.equal(last_other, last)
        token = last.argmax(-1)
        for _ in range(5):  # the steps after both prefills: identical too
            (last, states), (last_other, states_other) = (model.step(token, states),
                                                          model.step(token, states_other))
            assert torch.equal(last, last_other)
            token = last.argmax(-1)


def test_greedy_generation_from_a_padded_prefill_is_each_prompt_alone():
    model = hybrid_lm()
    prompts = token_prompts()
    out = generate(model, prompts, 12)
    assert all(torch.equal(o, generate(model, p[None], 12)[0]) for o, p in zip(out, prompts, strict=True))
    with torch.inference_mode():  # and the logits, step by step, fed the same tokens
        logits, states = prefill_prompts(model, prompts)
        singles = [model.prefill(p[None]) for p in prompts]
        for _ in range(8):
            expected = torch.cat([lg for lg, _ in singles])
            torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-10)
            token = expected.argmax(-1)
            logits, states = model.step(token, states)
            singles = [model.step(token[i : i + 1], s) for i, (_, s) in enumerate(singles)]


BAD_STARTS = [(torch.tensor([0, 9, 1]), r"\[0, 9\)"), (torch.tensor([0, 1]), r"\(3,\)"),
              (torch.tensor([0.0, 1.0, 2.0]), "integer"), (torch.tensor([True, False, True]), "integer"),
              ([0, 1, 2], "list")]


@pytest.mark.parametrize("start, match", BAD_STARTS)
def test_bad_start_is_one_line(start, match):
    model = hybrid_lm()
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(3, 9, dtype=torch.long), start=start)
    with pytest.raises(ValueError, match=match):
        model.prefill(torch.zeros(3, 9, dtype=torch.long), start=start)


def test_merged_prefills_equal_the_padded_prefill():
    """Prompts prefilled one by one and merged (`merge_prefills`, every layer's `merge_states`) decode as
    their one left-padded prefill does."""
    model = hybrid_lm()
    prompts = token_prompts()
    with torch.inference_mode():
        logits, states = prefill_prompts(model, prompts)
        singles = [model.prefill(p[None]) for p in prompts]
        merged_logits = torch.cat([lg for lg, _ in singles])
        merged = merge_prefills(model, [s for _, s in singles])
        for _ in range(6):
            torch.testing.assert_close(merged_logits, logits, rtol=1e-9, atol=1e-10)
            token = logits.argmax(-1)
            (logits, states), (merged_logits, merged) = model.step(token, states), model.step(token, merged)
