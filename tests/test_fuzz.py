"""Property/fuzz suite over layer and model configs.

Valid configs (any registered layer, random sizes, lengths 1..seq_len, float32/float64/bfloat16) give
outputs of the right shape and dtype, finite and causal; one step past seq_len raises the documented
ValueError. Malformed configs fail when built, with a ValueError/TypeError naming the bad argument.
"""

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spectralds.layers import build_layer
from spectralds.layers.lds import MODES
from spectralds.models import LanguageModel

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# Relative tolerance of the causality check: FFT rounding spreads over all positions, and a bf16 output
# may round the other way; a causality bug moves the outputs by O(1) of their scale.
CAUSAL_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module", autouse=True)
def filter_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECTRALDS_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@st.composite
def layer_configs(draw) -> tuple[str, dict[str, Any]]:
    """A layer name and valid `build_layer` kwargs for it."""
    name = draw(st.sampled_from(["stu", "stu_t", "lds", "attn"]))
    seq_len = draw(st.integers(1, 48))
    if name == "attn":
        heads = draw(st.integers(1, 4))
        return name, {
            "dim": heads * draw(st.sampled_from([2, 4, 6])),
            "num_heads": heads,
            "seq_len": seq_len,
            "window_size": draw(st.none() | st.integers(1, seq_len + 2)),
            "softcap": draw(st.none() | st.floats(0.5, 50.0)),
        }
    kwargs = {
        "dim": draw(st.integers(1, 6)),
        "seq_len": seq_len,
        "num_filters": draw(st.integers(1, min(seq_len, 6))),
        "dim_out": draw(st.none() | st.integers(1, 6)),
    }
    if name == "lds":
        kwargs |= {
            "state_dim": draw(st.integers(1, 12)),
            "mode": draw(st.sampled_from(MODES)),
            "learnable": draw(st.booleans()),
            "dtype": draw(st.sampled_from(["float32", "float64"])),
            "chunk_size": draw(st.sampled_from([1, 3, 8, 64])),
        }
    else:
        kwargs["variant"] = draw(st.sampled_from(["hankel", "hankel_L", "tensor"]))
    return name, kwargs


def build(name: str, kwargs: dict[str, Any], seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    layer = build_layer(name, **kwargs)
    if name == "lds" and not layer.learnable:  # a fixed system starts at zero: install a stable one
        h, K = layer.state_dim, layer.num_filters
        layer.set_system(torch.rand(h) * 2 - 1, torch.randn(h), torch.randn(h, 2 * K) / math.sqrt(h))
    return layer.eval()


@settings(max_examples=40, deadline=None)
@given(
    config=layer_configs(),
    dtype=st.sampled_from(DTYPES),
    batch=st.integers(1, 3),
    data=st.data(),
)
def test_valid_layer_configs_give_finite_causal_outputs(config, dtype, batch, data):
    name, kwargs = config
    seq_len = kwargs["seq_len"]
    layer = build(name, kwargs, seed=data.draw(st.integers(0, 2**16), label="seed")).to(dtype)
    T = data.draw(st.integers(1, seq_len), label="length")
    t0 = data.draw(st.integers(0, T - 1), label="perturbed position")
    x = torch.randn(batch, T, kwargs["dim"]).to(dtype)
    with torch.no_grad():
        y = layer(x)
        x2 = x.clone()
        x2[:, t0] += 10 * torch.randn(batch, kwargs["dim"]).to(dtype)
        y2 = layer(x2)
    dim_out = kwargs.get("dim_out") or kwargs["dim"]
    assert y.shape == (batch, T, dim_out) and y.dtype == dtype
    assert torch.isfinite(y).all() and torch.isfinite(y2).all()
    scale = max(y.abs().max().item(), 1e-30)
    if t0:
        assert (y2[:, :t0] - y[:, :t0]).abs().max().item() <= CAUSAL_TOL[dtype] * scale
    with pytest.raises(ValueError, match=f"sequence length {seq_len + 1} exceeds"):
        layer(torch.randn(batch, seq_len + 1, kwargs["dim"]).to(dtype))


# ---- malformed layer configs ------------------------------------------------------------------------

NOT_POSITIVE_INTS = [0, -3, 2.5, "8", None, True]


def bad_layer_args(name: str, kwargs: dict[str, Any]) -> list[tuple[str, Any]]:
    """(argument, bad value) pairs for layer `name` whose valid kwargs are `kwargs`."""
    bad = [("dim", v) for v in NOT_POSITIVE_INTS]
    bad += [("seq_len", v) for v in (0, -1, 2.5, "16")]
    if name == "attn":
        bad += [("num_heads", v) for v in (*NOT_POSITIVE_INTS, kwargs["dim"] + 1)]
        bad += [("window_size", v) for v in (0, -1, 1.5, "4")]
        bad += [("softcap", v) for v in (0.0, -1.0, math.nan, math.inf, "x")]
        bad += [("dropout", v) for v in (-0.1, 1.5, "x")]
        bad += [("rope_theta", v) for v in (0.0, -1.0, math.nan, "x")]
        return bad
    bad += [("num_filters", v) for v in (*NOT_POSITIVE_INTS, kwargs["seq_len"] + 1)]
    bad += [("dim_out", v) for v in (0, -1, 1.5, "4")]
    if name == "lds":
        bad += [("state_dim", v) for v in NOT_POSITIVE_INTS]
        bad += [("chunk_size", v) for v in NOT_POSITIVE_INTS]
        bad += [("mode", v) for v in ("approx", 1, None)]
        bad += [("dtype", v) for v in ("float16", "bogus", torch.int64, torch.bfloat16, 32, None)]
    else:
        bad += [("variant", v) for v in ("bogus", 3, None)]
    return bad


@settings(max_examples=40, deadline=None)
@given(config=layer_configs(), data=st.data())
def test_malformed_layer_configs_raise_clear_errors(config, data):
    name, kwargs = config
    arg, value = data.draw(st.sampled_from(bad_layer_args(name, kwargs)), label="bad argument")
    with pytest.raises((ValueError, TypeError), match=rf"\b{arg}\b"):
        build_layer(name, **(kwargs | {arg: value}))


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("bogus", {"dim": 4}, "unknown layer 'bogus'"),
        (["stu"], {"dim": 4}, "layer name"),
        (None, {"dim": 4}, "layer name"),
        ("stu", {"dim": 4, "seq_len": 8, "bogus_arg": 1}, "bogus_arg"),
        ("attn", {"dim": 8, "heads": 2}, "heads"),
        ("lds", {}, "dim"),
    ],
)
def test_unknown_layers_and_arguments_raise_clear_errors(name, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build_layer(name, **kwargs)


# ---- malformed model configs ------------------------------------------------------------------------

PATTERNS = [["stu"], ["stu_t"], ["lds"], ["attn"], ["stu", "attn"]]


def model_kwargs(pattern: list[str]) -> dict[str, Any]:
    return {
        "vocab_size": 16, "dim": 8, "num_layers": 2, "layer_pattern": pattern, "seq_len": 16,
        "num_filters": 4,
        "layer_kwargs": {"attn": {"num_heads": 2, "window_size": 4}, "lds": {"state_dim": 6}},
    }


def bad_model_args(pattern: list[str]) -> list[tuple[str, Any, str]]:
    """(argument, bad value, what the message must name) for a model with `pattern`."""
    bad = [("vocab_size", v, "vocab_size") for v in (0, -1, 2.5, "16", None)]
    bad += [("dim", v, "dim") for v in (0, -8, 2.5, "8")]
    bad += [("num_layers", v, "num_layers") for v in (-1, 2.5, "2", None)]
    bad += [("seq_len", v, "seq_len") for v in (0, -1, 2.5)]
    bad += [("layer_pattern", v, "layer_pattern") for v in ("stu", [3], [["stu"]], [])]
    bad += [("layer_pattern", ["stu", "bogus"], "bogus")]
    bad += [("mlp_ratio", v, "mlp_ratio") for v in (-1.0, math.nan, "4")]
    bad += [("dropout", v, "dropout") for v in (-0.5, 1.5)]
    bad += [("nonfinite_loss", "ignore", "nonfinite_loss")]
    bad += [("layer_kwargs", v, "layer_kwargs") for v in (["attn"], {"attn": 2})]
    if any(name in ("stu", "stu_t", "lds") for name in pattern):
        bad += [("num_filters", v, "num_filters") for v in (0, -1, 17, 2.5)]
        bad += [("layer_kwargs", {name: {"bogus_arg": 1}}, "bogus_arg") for name in pattern]
    if "attn" in pattern:
        bad += [("layer_kwargs", {"attn": {"num_heads": 3}}, "num_heads")]
        bad += [("layer_kwargs", {"attn": {"num_heads": 2, "window_size": 0}}, "window_size")]
    return bad


@settings(max_examples=30, deadline=None)
@given(pattern=st.sampled_from(PATTERNS), data=st.data())
def test_malformed_model_configs_raise_clear_errors(pattern, data):
    arg, value, match = data.draw(st.sampled_from(bad_model_args(pattern)), label="bad argument")
    with pytest.raises((ValueError, TypeError), match=rf"\b{match}\b"):
        LanguageModel(**(model_kwargs(pattern) | {arg: value}))


@pytest.mark.parametrize("pattern", PATTERNS, ids="-".join)
def test_valid_model_configs_build_and_run(pattern):
    torch.manual_seed(0)
    model = LanguageModel(**model_kwargs(pattern)).eval()
    with torch.no_grad():
        logits = model(torch.randint(16, (2, 16)))
    assert logits.shape == (2, 16, 16) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="exceeds the model's seq_len 16"):
        model(torch.randint(16, (1, 17)))
