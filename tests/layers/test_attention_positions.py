"""Attention positions: RoPE, none, ALiBi (after the soft cap), exact in every backend and decoding path."""

import math
import warnings

import pytest
import torch
from test_decode_batched import prompts, rel, static_decode

from spectralds.errors import UserError
from spectralds.generate import generate, prefill_prompts
from spectralds.layers import attention
from spectralds.layers.attention import SlidingWindowAttention
from spectralds.layers.kv_cache import RingKVCache, merge_caches
from spectralds.layers.positions import alibi_slopes
from spectralds.models import LanguageModel

F64 = torch.float64


def reference(layer: SlidingWindowAttention, x: torch.Tensor, bias_before_cap: bool = False) -> torch.Tensor:
    """An explicit (T, T) score matrix per head: scaled q.k, soft cap, ALiBi bias, causal window, softmax.
    No RoPE: for positions "none" and "alibi" only."""
    B, T, _ = x.shape
    H, hd = layer.num_heads, layer.head_dim
    q, k, v = layer.qkv(x).view(B, T, 3, H, hd).unbind(2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
    t, s = torch.arange(T)[:, None], torch.arange(T)[None, :]
    bias = torch.zeros(H, T, T, dtype=F64)
    if layer.positions == "alibi":
        slopes = torch.tensor(alibi_slopes(H, layer.alibi_slope_scale), dtype=F64)
        bias = -slopes[:, None, None] * (t - s)
    if bias_before_cap:
        scores = scores + bias
    if layer.softcap is not None:
        scores = layer.softcap * torch.tanh(scores / layer.softcap)
    if not bias_before_cap:
        scores = scores + bias
    allowed = (s <= t) & ((t - s < layer.window_size) if layer.window_size is not None else True)
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return layer.o_proj(torch.einsum("bhts,bshd->bthd", weights, v).flatten(2))


def make(positions="alibi", dim=24, heads=3, **kw) -> SlidingWindowAttention:
    torch.manual_seed(0)
    layer = SlidingWindowAttention(dim, num_heads=heads, positions=positions, **kw).double().eval()
    with torch.no_grad():
        layer.qkv.weight.mul_(3.0)  # larger scores: the soft cap and the bias both matter
    return layer


def test_alibi_slopes_are_the_papers():
    assert alibi_slopes(8) == [2.0**-i for i in range(1, 9)]
    assert alibi_slopes(2) == [2.0**-4, 2.0**-8]
    # 6 heads: the 4-head slopes, then the odd-indexed... every other one of the 8-head slopes
    assert alibi_slopes(6) == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
    assert alibi_slopes(12, 0.25) == pytest.approx([0.25 * s for s in alibi_slopes(12)], rel=1e-15)
    assert alibi_slopes(1) == [2.0**-8]


BACKENDS = ["math", "sdpa"] + (["flex"] if attention.flex_attention is not None else [])


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("positions, scale", [("alibi", 1.0), ("alibi", 0.25), ("none", 1.0)])
@pytest.mark.parametrize("window", [None, 1, 4, 5])  # 4, 5: T = 23 > 2 window takes the banded SDPA path
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_every_backend_matches_the_plain_reference(backend, positions, scale, window, softcap):
    if backend == "sdpa" and softcap is not None:
        pytest.skip("SDPA has no soft cap")
    layer = make(positions, window_size=window, softcap=softcap, backend=backend, alibi_slope_scale=scale)
    x = torch.randn(2, 23, 24, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-11, atol=1e-11)


def test_the_bias_enters_after_the_soft_cap():
    layer = make(window_size=None, softcap=0.5)
    x = torch.randn(1, 16, 24, dtype=F64)
    with torch.no_grad():
        after, before = reference(layer, x), reference(layer, x, bias_before_cap=True)
        assert (after - before).abs().max() > 1e-3  # the order matters here
        torch.testing.assert_close(layer(x), after, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("window", [None, 8])
def test_sdpa_and_math_agree_in_backward(window):
    x = torch.randn(2, 21, 24, dtype=F64, requires_grad=True)
    grads = []
    for backend in ("sdpa", "math"):
        layer = make(window_size=window, backend=backend, alibi_slope_scale=0.25)
        grads.append(torch.autograd.grad(layer(x).square().sum(), [x, *layer.parameters()]))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("positions", ["alibi", "none"])
@pytest.mark.parametrize("window", [None, 1, 3, 4, 5, 30])  # 4, 5: the prompt ends mid-ring
def test_prefill_and_steps_match_forward(positions, window):
    layer = make(positions, window_size=window, softcap=5.0)
    x = torch.randn(2, 17, 24, dtype=F64)
    with torch.no_grad():
        full = layer(x)
        y, state = layer.prefill(x[:, :6])
        ys = [y]
        for t in range(6, 17):
            y_t, state = layer.step(x[:, t], state)
            ys.append(y_t[:, None])
        torch.testing.assert_close(torch.cat(ys, 1), full, rtol=1e-10, atol=1e-10)
        if window is not None:  # the fixed-shape ring cache, from a prefill, steps the same
            y, state = layer.prefill(x[:, :6])
            ring = layer.static_state(state)
            assert isinstance(ring, RingKVCache)
            for t in range(6, 17):
                y_t, ring = layer.step(x[:, t], ring)
                torch.testing.assert_close(y_t, full[:, t], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [None, 4, 30])
@pytest.mark.parametrize("static", [False, True])
def test_merged_prompts_of_different_lengths_decode_as_each_alone(window, static):
    if static and window is None:
        pytest.skip("full attention has no fixed-shape cache")
    layer = make("alibi", window_size=window, alibi_slope_scale=0.5)
    lengths, steps = (3, 9, 1, 6), 8
    seqs = [torch.randn(1, n + steps, 24, dtype=F64) for n in lengths]
    with torch.no_grad():
        fulls = [layer(s)[0] for s in seqs]
        state = merge_caches([layer.prefill(s[:, :n])[1] for s, n in zip(seqs, lengths, strict=True)], window)
        if static:
            state = layer.static_state(state)
        for i in range(steps):
            x_t = torch.cat([s[:, n + i] for s, n in zip(seqs, lengths, strict=True)])
            y_t, state = layer.step(x_t, state)
            expected = torch.stack([f[n + i] for f, n in zip(fulls, lengths, strict=True)])
            torch.testing.assert_close(y_t, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [None, 4])
def test_language_model_with_alibi_decodes_batched_prompts_as_each_alone(window):
    torch.manual_seed(0)
    attn = {"num_heads": 2, "window_size": window, "positions": "alibi", "alibi_slope_scale": 0.25}
    model = LanguageModel(vocab_size=32, dim=16, num_layers=2, layer_pattern=["lds", "attn"], seq_len=40,
                          num_filters=4, layer_kwargs={"attn": attn, "lds": {"state_dim": 8}}).eval()
    assert model.blocks[1].mixer.alibi_slope_scale == 0.25
    batch = prompts()
    out = generate(model, batch, 10)
    assert all(torch.equal(o, generate(model, p[None], 10)[0]) for o, p in zip(out, batch, strict=True))
    with torch.inference_mode():
        logits, states = prefill_prompts(model, batch)
        full = [model(o[None, :-1])[0, -10:] for o in out]  # the forward's logits at generated positions
        eager = []
        for i in range(10):
            eager.append(logits)
            assert rel(logits, torch.stack([f[i] for f in full])) < 1e-5
            logits, states = model.step(logits.argmax(-1), states)
        if window is not None:
            assert rel(static_decode(model, batch, 10), torch.stack(eager)) < 1e-6


def test_the_ring_step_with_alibi_has_no_position_baked_in():
    """Traced once (as a CUDA graph records it), replayed past the ring's wrap: still exact."""
    layer = make("alibi", window_size=4).requires_grad_(False)
    x = torch.randn(2, 14, 24, dtype=F64)
    with torch.no_grad():
        full = layer(x)
        ring = layer.static_state(layer.prefill(x[:, :3])[1])
        layer.step(x[:, 3], RingKVCache(ring.k.clone(), ring.v.clone(), ring.pos.clone()))  # slopes cached

        def flat_step(x_t, k, v, pos):
            y, state = layer.step(x_t, RingKVCache(k, v, pos))
            return y, *state

        with warnings.catch_warnings():  # a position read on the host shows up as one of these warnings
            tracer = torch.jit.TracerWarning
            warnings.filterwarnings("error", message=".*(Python|constant)", category=tracer)
            warnings.filterwarnings("ignore", message="Iterating over a tensor", category=tracer)
            traced = torch.jit.trace(flat_step, (x[:, 3], ring.k.clone(), ring.v.clone(), ring.pos.clone()),
                                     check_trace=False)
        state = tuple(ring)
        for t in range(3, 14):
            y, *state = traced(x[:, t], *state)
            torch.testing.assert_close(y, full[:, t], rtol=1e-10, atol=1e-10)


def test_without_positions_the_last_output_ignores_the_order_of_earlier_tokens():
    x = torch.randn(1, 12, 24, dtype=F64)
    perm = torch.cat([torch.randperm(11), torch.tensor([11])])
    with torch.no_grad():
        for positions, invariant in (("none", True), ("rope", False), ("alibi", False)):
            layer = make(positions, window_size=None)
            a, b = layer(x)[0, -1], layer(x[:, perm])[0, -1]
            assert torch.allclose(a, b, atol=1e-12) == invariant, positions


def test_flops_and_parameters_do_not_depend_on_positions():
    layers = [make(p, window_size=8) for p in ("rope", "none", "alibi")]
    assert len({layer.forward_flops(2, 64) for layer in layers}) == 1
    assert len({tuple(layer.state_dict()) for layer in layers}) == 1  # ALiBi slopes are not weights


def test_odd_head_size_is_allowed_without_rope():
    layer = make("alibi", dim=15, heads=3)  # head_dim 5
    x = torch.randn(1, 9, 15, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-11, atol=1e-11)
    with pytest.raises(UserError, match="even size"):
        make("rope", dim=15, heads=3)


@pytest.mark.parametrize("kwargs, message", [
    ({"positions": "learned"}, "positions must be one of"),
    ({"positions": "rope", "alibi_slope_scale": 0.25}, "alibi_slope_scale is for positions='alibi'"),
    ({"alibi_slope_scale": 0.0}, "alibi_slope_scale must be > 0"),
])
def test_bad_positions_are_one_line_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message) as info:
        SlidingWindowAttention(16, num_heads=2, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or attention.flash_attn_func is None, reason="needs CUDA + flash-attn"
)
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_flash_attention_alibi_matches_math_on_gpu(softcap):
    layers = [make("alibi", dim=128, heads=4, window_size=64, softcap=softcap, backend=k,
                   alibi_slope_scale=0.25).float().cuda() for k in ("math", "flash")]
    x = torch.randn(2, 300, 128, device="cuda")
    with torch.no_grad():
        expected = layers[0](x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layers[1](x)
    assert (y.float() - expected).abs().max() < 3e-2 * expected.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or attention.flex_attention is None, reason="needs CUDA")
def test_flex_alibi_matches_math_on_gpu():
    layers = [make("alibi", dim=128, heads=4, window_size=64, softcap=30.0, backend=k,
                   alibi_slope_scale=0.25).float().cuda() for k in ("math", "flex")]
    x = torch.randn(2, 300, 128, device="cuda", requires_grad=True)
    out = []
    for layer in layers:
        y = layer(x)
        out.append([y, *torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])])
    for a, b in zip(*out, strict=True):
        assert (a - b).abs().max() < 1e-3 * b.abs().max()
