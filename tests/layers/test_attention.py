import math

import pytest
import torch

from spectralds.layers import attention
from spectralds.layers.attention import SlidingWindowAttention
from spectralds.layers.positions import rope
from spectralds.layers.registry import build_layer


def reference_attention(
    layer: SlidingWindowAttention, x: torch.Tensor, use_rope: bool = True
) -> torch.Tensor:
    """Plain math, one (head, query, key) triple at a time where it matters: RoPE as complex rotation."""
    B, T, D = x.shape
    H, hd = layer.num_heads, layer.head_dim
    q, k, v = layer.qkv(x).view(B, T, 3, H, hd).unbind(2)  # (B, T, H, hd)
    if use_rope:
        half = hd // 2
        freqs = layer.rope_theta ** (-torch.arange(half, dtype=torch.float64) / half)
        rot = torch.polar(torch.ones(T, half, dtype=torch.float64), torch.arange(T)[:, None] * freqs)
        rot = rot[None, :, None]  # (1, T, 1, half)

        def rotate(t):
            z = torch.complex(t[..., :half].double(), t[..., half:].double()) * rot
            return torch.cat([z.real, z.imag], dim=-1).to(t.dtype)

        q, k = rotate(q), rotate(k)
    out = torch.zeros(B, T, H, hd, dtype=x.dtype)
    for t in range(T):
        start = 0 if layer.window_size is None else max(0, t - layer.window_size + 1)
        scores = torch.einsum("bhd,bshd->bhs", q[:, t], k[:, start : t + 1]) / math.sqrt(hd)
        if layer.softcap is not None:
            scores = layer.softcap * torch.tanh(scores / layer.softcap)
        out[:, t] = torch.einsum("bhs,bshd->bhd", scores.softmax(-1), v[:, start : t + 1])
    return layer.o_proj(out.flatten(2))


def make(dim=16, heads=2, **kw) -> SlidingWindowAttention:
    torch.manual_seed(0)
    return SlidingWindowAttention(dim, num_heads=heads, **kw).double().eval()


@pytest.mark.parametrize("window", [None, 1, 4, 40])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_forward_matches_reference_math(window, softcap):
    layer = make(window_size=window, softcap=softcap)
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    assert torch.allclose(layer(x), reference_attention(layer, x), atol=1e-12)


@pytest.mark.parametrize("window", [None, 1, 3, 4, 5, 8, 30])  # 4, 5: the prompt ends mid-ring
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_decoding_steps_match_forward(window, softcap):
    layer = make(window_size=window, softcap=softcap)
    x = torch.randn(2, 17, 16, dtype=torch.float64)
    y_full = layer(x)
    y, state = layer.prefill(x[:, :6])
    assert state.k.shape[2] == min(6, window or 6) and state.pos == 6
    ys = [y]
    for t in range(6, 17):
        y_t, state = layer.step(x[:, t], state)
        assert state.entries(window) == min(t + 1, window or t + 1) and state.v.shape == state.k.shape
        assert window is None or state.k.shape[2] <= window  # a window's cache never outgrows it
        ys.append(y_t[:, None])
    assert torch.allclose(torch.cat(ys, dim=1), y_full, atol=1e-10)
    state = layer.init_state(2, dtype=torch.float64)
    steps = []
    for t in range(17):
        y_t, state = layer.step(x[:, t], state)
        steps.append(y_t)
    assert torch.allclose(torch.stack(steps, dim=1), y_full, atol=1e-10)
    assert state.entries(window) == min(17, window or 17) and state.k.shape[2] >= state.entries(window)


def test_tokens_outside_the_window_have_no_influence():
    layer = make(window_size=4)
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 2] += 1.0
    changed = (layer(x) - layer(x2)).abs().amax(-1)[0] > 1e-12
    assert changed.tolist() == [False, False, True, True, True, True] + [False] * 6


def test_rope_scores_depend_only_on_position_difference():
    q, k = torch.randn(2, 1, 8, dtype=torch.float64).unbind(0)
    scores = [
        (rope(q, torch.tensor([t])) * rope(k, torch.tensor([s]))).sum().item()
        for t, s in [(5, 2), (105, 102), (5000, 4997), (3, 5)]
    ]
    assert scores[0] == pytest.approx(scores[1], abs=1e-5) and scores[0] == pytest.approx(scores[2], abs=1e-5)
    assert abs(scores[0] - scores[3]) > 1e-3  # a different lag gives a different score


def test_attention_rotates_by_position_not_by_head():
    # Permuting the earlier tokens changes the last output only through positions (RoPE).
    layer = make()
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    perm = torch.cat([torch.randperm(8), torch.tensor([8])])
    last, last_perm = layer(x)[0, -1], layer(x[:, perm])[0, -1]
    assert not torch.allclose(last, last_perm, atol=1e-4)
    # Without RoPE the same check could not tell: attention alone is invariant to that permutation.
    no_rope = reference_attention(layer, x, use_rope=False)[0, -1]
    assert torch.allclose(no_rope, reference_attention(layer, x[:, perm], use_rope=False)[0, -1])


def test_sdpa_path_is_used_and_matches_math_path(monkeypatch):
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        attention.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k)
    )
    layer = make(window_size=6)  # 11 <= 2 x 6: one masked call (longer inputs go in blocks: banded_sdpa)
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    y = layer(x)
    assert calls == [1]
    layer.softcap = 1e6  # same result through the plain-math path (tanh is the identity at this scale)
    assert torch.allclose(y, layer(x), atol=1e-9) and calls == [1]


def test_errors_and_registry():
    with pytest.raises(ValueError, match="heads"):
        SlidingWindowAttention(10, num_heads=3)
    with pytest.raises(ValueError, match="window_size"):
        SlidingWindowAttention(16, num_heads=2, window_size=0)
    layer = build_layer("attn", dim=16, num_heads=2, seq_len=8)
    assert isinstance(layer, SlidingWindowAttention) and layer(torch.randn(1, 8, 16)).shape == (1, 8, 16)
    with pytest.raises(ValueError, match="seq_len 8"):
        layer(torch.randn(1, 9, 16))


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or attention.flash_attn_func is None, reason="needs CUDA + flash-attn"
)
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_flash_attention_matches_reference_on_gpu(softcap):
    layer = make(dim=128, heads=2, window_size=64, softcap=softcap).float().cuda()
    x = torch.randn(2, 300, 128, device="cuda")
    expected = layer(x)  # float32: SDPA / math path
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert (y.float() - expected).abs().max() < 3e-2 * expected.abs().max()


def test_training_forward_builds_no_kv_cache(monkeypatch):
    layer = make(window_size=4)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    expected = layer.prefill(x)[0]

    def no_cache(*args, **kwargs):
        raise AssertionError("forward built a KV cache")

    monkeypatch.setattr(attention, "KVCache", no_cache)
    monkeypatch.setattr(layer, "prefill", no_cache)
    assert torch.equal(layer(x), expected)


# ---- kernel choice: FlexAttention / SDPA / math ----------------------------------------------------------

needs_flex = pytest.mark.skipif(attention.flex_attention is None, reason="torch without FlexAttention")


@needs_flex
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("window", [None, 1, 4, 40])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_flex_kernel_matches_reference_on_cpu(window, softcap):
    """FlexAttention's block mask and soft-cap score_mod, against the reference (RoPE included). CPU: no
    backward in torch 2.13, so forward only."""
    layer = make(window_size=window, softcap=softcap, backend="flex")
    x = torch.randn(2, 37, 16, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
        assert torch.allclose(y, reference_attention(layer, x), atol=1e-12)
        layer(x[:, :20])  # another length: another block mask
    assert len(layer._block_masks) == 1


@pytest.mark.parametrize("window", [None, 3, 4, 40])  # 3, 4: banded blocks (21 = 7 x 3; 4 pads)
def test_sdpa_and_math_kernels_agree_forward_and_backward(window):
    x = torch.randn(2, 21, 16, dtype=torch.float64, requires_grad=True)
    results = []
    for backend in ("sdpa", "math"):
        layer = make(window_size=window, backend=backend)
        y = layer(x)
        results.append([y, *torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])])
    assert torch.allclose(results[0][0], reference_attention(layer, x.detach()), atol=1e-12)
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, atol=1e-12)


def test_auto_kernel_choice_and_forced_kernel_errors():
    x = torch.randn(1, 8, 16, dtype=torch.float64)
    assert make(window_size=4)._backend_for(x, 0.0) == "sdpa"  # CPU: FlexAttention has no backward here
    assert make(softcap=3.0)._backend_for(x, 0.0) == "math"
    with pytest.raises(ValueError, match="backend"):
        SlidingWindowAttention(16, num_heads=2, backend="xformers")
    with pytest.raises(ValueError, match="soft cap"):
        make(softcap=3.0, backend="sdpa")(x)
    if attention.flash_attn_func is None:
        with pytest.raises(ValueError, match="flash-attn"):
            make(backend="flash")(x)
    if attention.flex_attention is not None:
        with pytest.raises(ValueError, match="backward on CPU"):
            make(window_size=4, backend="flex")(x.requires_grad_())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or attention.flex_attention is None, reason="needs CUDA")
@pytest.mark.parametrize("window, softcap", [(None, None), (64, None), (64, 30.0)])
def test_flex_attention_matches_sdpa_on_gpu(window, softcap):
    layers = [make(dim=128, heads=2, window_size=window, softcap=softcap, backend=k).float().cuda()
              for k in ("flex", "math")]
    x = torch.randn(2, 300, 128, device="cuda", requires_grad=True)
    out = []
    for layer in layers:
        y = layer(x)
        out.append([y, *torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])])
    for a, b in zip(*out, strict=True):
        assert (a - b).abs().max() < 1e-3 * b.abs().max()


@pytest.mark.parametrize("T, window", [(23, 5), (10, 4), (12, 4)])
def test_banded_sdpa_is_the_windowed_mask(T, window):
    q, k, v = (torch.randn(2, 3, T, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    w = torch.randn(2, 3, T, 8, dtype=torch.float64)
    mask = attention.window_mask(T, window)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = attention.banded_sdpa(q, k, v, window)
    assert torch.allclose(out, ref, atol=1e-12)
    for a, b in zip(torch.autograd.grad((out * w).sum(), [q, k, v]),
                    torch.autograd.grad((ref * w).sum(), [q, k, v]), strict=True):
        assert torch.allclose(a, b, atol=1e-12)


def test_renamed_backend_argument_still_builds_with_a_warning():
    """Checkpoints and configs written when the attention backend was called `kernel` still load."""
    from spectralds.errors import UserError
    from spectralds.layers import build_layer

    with pytest.warns(FutureWarning, match="'kernel' is now called 'backend'"):
        layer = build_layer("attn", dim=16, num_heads=2, kernel="math")
    assert layer.backend == "math" and layer.build_spec["backend"] == "math"
    with pytest.raises(UserError, match="both 'kernel' and its new name 'backend'"):
        build_layer("attn", dim=16, num_heads=2, kernel="math", backend="sdpa")
