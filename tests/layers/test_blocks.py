import pytest
import torch
import torch.nn.functional as F

from spectralds.layers.attention import SlidingWindowAttention
from spectralds.layers.blocks import Block, RMSNorm, SwiGLU
from spectralds.layers.lds import LDS, make_lds

F64 = torch.float64


def lds_mixer(dim=8, mode="exact") -> LDS:
    torch.manual_seed(1)
    layer = make_lds(dim, num_filters=2, state_dim=6, mode=mode, learnable=False, dtype=F64, chunk_size=4)
    A = torch.tensor([0.99, -0.99, 0.5, -0.5, 0.0, 0.9], dtype=F64)
    layer.set_system(A, torch.randn(6, dtype=F64), torch.randn(6, 4, dtype=F64))
    return layer


def test_rmsnorm_matches_formula_and_keeps_dtype():
    norm = RMSNorm(6, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(2, 3, 6)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert torch.allclose(norm(x), expected, atol=1e-6)
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_swiglu_is_silu_gated():
    mlp = SwiGLU(6, 10)
    x = torch.randn(2, 3, 6)
    expected = mlp.w2(F.silu(mlp.w1(x)) * mlp.w3(x))
    assert torch.allclose(mlp(x), expected) and mlp(x).shape == (2, 3, 6)
    assert mlp.w1.weight.shape == (10, 6) and mlp.w1.bias is None


def test_block_is_prenorm_residual():
    block = Block(8, lds_mixer(), mlp_hidden=16).double()
    x = torch.randn(2, 10, 8, dtype=F64)
    h = x + block.mixer(block.norm1(x))
    assert torch.allclose(block(x), h + block.mlp(block.norm2(h)))
    bare = Block(8, lds_mixer(), mlp_hidden=None).double()
    assert bare.mlp is None and bare.norm2 is None
    assert torch.allclose(bare(x), x + bare.mixer(bare.norm1(x)))


@pytest.mark.parametrize(
    "mixer",
    [lds_mixer(), lds_mixer(mode="tensordot"), SlidingWindowAttention(8, num_heads=2, window_size=3)],
    ids=["lds", "lds-tensordot", "attn"],
)
def test_block_steps_match_forward(mixer):
    block = Block(8, mixer, mlp_hidden=12).double().eval()
    x = torch.randn(2, 11, 8, dtype=F64)
    y_full = block(x)
    state = block.init_state(2, dtype=F64)
    steps = []
    for t in range(11):
        y_t, state = block.step(x[:, t], state)
        steps.append(y_t)
    assert torch.allclose(torch.stack(steps, dim=1), y_full, atol=1e-10)
    y, state = block.prefill(x[:, :7])
    ys = [y]
    for t in range(7, 11):
        y_t, state = block.step(x[:, t], state)
        ys.append(y_t[:, None])
    assert torch.allclose(torch.cat(ys, dim=1), y_full, atol=1e-10)


def test_swapping_the_mixer_is_one_assignment():
    block = Block(8, SlidingWindowAttention(8, num_heads=2), mlp_hidden=12).double()
    x = torch.randn(1, 9, 8, dtype=F64)
    before = block(x)
    block.mixer = lds_mixer()
    h = x + block.mixer(block.norm1(x))
    assert torch.allclose(block(x), h + block.mlp(block.norm2(h)))
    assert not torch.allclose(block(x), before)
    assert any(k.startswith("mixer.") and k.endswith(".A") for k in block.state_dict())


def test_dropout_only_in_training():
    block = Block(8, lds_mixer(), mlp_hidden=12, dropout=0.5).double()
    x = torch.randn(1, 9, 8, dtype=F64)
    assert not torch.allclose(block.train()(x), block(x))
    assert torch.equal(block.eval()(x), block(x))
