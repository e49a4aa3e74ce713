"""Architecture options of the MLP, the head and the norms: gate activation, biases, RMSNorm eps."""

import math

import pytest
import torch

from spectralds.errors import UserError
from spectralds.layers.blocks import Block, RMSNorm, SwiGLU
from spectralds.models import LanguageModel

F64 = torch.float64


def tiny_lm(**kw) -> LanguageModel:
    torch.manual_seed(0)
    args = dict(vocab_size=32, dim=16, num_layers=2, layer_pattern=["stu", "attn"], seq_len=32, num_filters=4,
                layer_kwargs={"attn": {"num_heads": 2, "window_size": 8}})
    args.update(kw)
    return LanguageModel(**args).eval()


def test_gelu_tanh_gate_is_the_tanh_formula():
    torch.manual_seed(0)
    mlp = SwiGLU(6, 10, activation="gelu_tanh").double()
    x = torch.randn(2, 3, 6, dtype=F64)
    g = mlp.w1(x)
    gelu = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
    torch.testing.assert_close(mlp(x), mlp.w2(gelu * mlp.w3(x)), rtol=1e-12, atol=1e-12)
    silu = SwiGLU(6, 10)
    silu.load_state_dict(mlp.state_dict())
    assert not torch.allclose(silu.double()(x), mlp(x))  # the option changes the function


def test_mlp_bias_puts_a_bias_on_each_linear():
    mlp = SwiGLU(6, 10, bias=True)
    assert all(lin.bias is not None for lin in (mlp.w1, mlp.w2, mlp.w3))
    with torch.no_grad():
        mlp.w2.bias.fill_(3.0)
        for lin in (mlp.w1, mlp.w3, mlp.w2):
            lin.weight.zero_()
    assert torch.equal(mlp(torch.randn(2, 6)), torch.full((2, 6), 3.0))


def test_rmsnorm_eps_none_is_the_dtypes_machine_epsilon():
    norm = RMSNorm(4, eps=None)
    x = torch.full((1, 4), 0.05)  # mean square 2.5e-3: bf16's eps (7.8e-3) is not negligible there
    for dtype in (torch.float32, torch.bfloat16):
        eps = torch.finfo(dtype).eps
        expected = 0.05 / math.sqrt(0.05**2 + eps)
        assert norm(x.to(dtype)).float()[0, 0].item() == pytest.approx(expected, rel=1e-2)
    assert norm(x.bfloat16()).float()[0, 0].item() < 0.6  # 1e-6 would give ~1.0


def test_language_model_carries_the_options_through_hparams_and_a_checkpoint(tmp_path):
    model = tiny_lm(mlp_activation="gelu_tanh", mlp_bias=True, head_bias=True, norm_eps=None)
    assert model.head.bias is not None and model.head.weight is model.embed.weight  # bias: own parameter
    assert "head.bias" in model.state_dict() and "blocks.0.mlp.w1.bias" in model.state_dict()
    assert all(b.mlp.activation == "gelu_tanh" for b in model.blocks) and model.norm.eps is None
    with torch.no_grad():
        model.head.bias.normal_()
        for block in model.blocks:
            block.mlp.w2.bias.normal_()
    rebuilt = LanguageModel(**model.hparams)
    rebuilt.load_state_dict(model.state_dict())
    idx = torch.randint(0, 32, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(idx), model(idx), rtol=0, atol=0)
    default = tiny_lm()
    assert default.head.bias is None and default.blocks[0].mlp.w1.bias is None
    assert default.blocks[0].mlp.activation == "silu" and default.norm.eps == 1e-6


def test_decoding_matches_forward_with_the_options():
    model = tiny_lm(mlp_activation="gelu_tanh", mlp_bias=True, head_bias=True, norm_eps=None).double()
    with torch.no_grad():
        model.head.bias.normal_()
    idx = torch.randint(0, 32, (2, 16))
    with torch.no_grad():
        full = model(idx)
        logits, states = model.prefill(idx[:, :9])
        torch.testing.assert_close(logits, full[:, 8], rtol=1e-9, atol=1e-9)
        for t in range(9, 16):
            logits, states = model.step(idx[:, t], states)
            torch.testing.assert_close(logits, full[:, t], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kwargs, message", [
    ({"mlp_activation": "relu"}, "mlp_activation must be one of"),
    ({"mlp_activation": "gelu", "mlp_ratio": 0}, "mlp_activation must be one of"),
    ({"mlp_bias": "yes"}, "mlp_bias must be true or false"),
    ({"head_bias": 1}, "head_bias must be true or false"),
    ({"norm_eps": -1.0}, "norm_eps must be >= 0"),
])
def test_bad_options_are_one_line_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message) as info:
        tiny_lm(**kwargs)
    assert "\n" not in str(info.value)


def test_block_without_mlp_still_checks_the_activation():
    with pytest.raises(UserError, match="mlp_activation"):
        Block(8, torch.nn.Identity(), mlp_hidden=None, mlp_activation="tanh")
