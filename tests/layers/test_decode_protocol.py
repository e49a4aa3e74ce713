"""The decoding protocol is closed: a layer registered here (an exponential moving average, unknown to the
package) gets batched prompts of different lengths, fixed-shape (CUDA-graph) states and lm-eval generation
by implementing `SequenceLayer` alone; every wrapper of a model delegates `decoding_layers`."""

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import spectralds.generate as generate_module
from spectralds.generate import (
    _clone,
    _leaves,
    generate,
    graphable,
    merge_prefills,
    prefill_prompts,
    static_states,
)
from spectralds.layers import SequenceLayer, register_layer
from spectralds.models import LanguageModel


@register_layer("test_ema")
class EMA(SequenceLayer):
    """s_t = decay * s_{t-1} + x_t @ W_in, y_t = s_t @ W_out: a (batch, dim) state at every position."""

    def __init__(self, dim: int, seq_len: int | None = None, decay: float = 0.7) -> None:
        super().__init__()
        self.decay = decay
        self.w_in = nn.Linear(dim, dim, bias=False)
        self.w_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        # Time-invariant from a zero state: left padding (zeroed by the caller) needs nothing.
        state, ys = self.init_state(x.shape[0], x.device, x.dtype), []
        for t in range(x.shape[1]):
            y, state = self.step(x[:, t], state)
            ys.append(y)
        return torch.stack(ys, 1)

    def init_state(self, batch_size, device=None, dtype=None) -> torch.Tensor:
        return torch.zeros(batch_size, self.w_in.in_features, device=device, dtype=dtype)

    def step(self, x_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.decay * state + self.w_in(x_t)
        return self.w_out(state), state

    def merge_states(self, states: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(states)  # zeros before a prompt leave its state as it is

    def static_state(self, state: torch.Tensor) -> torch.Tensor:
        return state  # one shape at every position


class ModelWithout:
    """A decoding model that does not list its decoding layers (a user's own module, say)."""

    def __init__(self, model):
        self.model, self.seq_len = model, model.seq_len

    def prefill(self, idx, start=None):
        return self.model.prefill(idx, start)

    def step(self, token, states):
        return self.model.step(token, states)


def tiny_lm(pattern, vocab_size: int = 32) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(
        vocab_size=vocab_size, dim=16, num_layers=len(pattern), layer_pattern=list(pattern), seq_len=40,
        num_filters=4, layer_kwargs={"attn": {"num_heads": 2, "window_size": 4}, "lds": {"state_dim": 8}},
    ).eval()


def prompts(lengths=(3, 9, 1, 6)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 32, (n,), generator=g) for n in lengths]


class Delegating:
    """A wrapper delegating to a model (as lm-eval's once did to mask logits): what `generate` may be
    handed besides the model itself."""

    def __init__(self, model) -> None:
        self.model, self.seq_len = model, model.seq_len

    def prefill(self, tokens, start=None):
        return self.model.prefill(tokens) if start is None else self.model.prefill(tokens, start)

    def decoding_layers(self):
        return self.model.decoding_layers()

    def step(self, token, states):
        return self.model.step(token, states)


def wrappers(model) -> list:
    """The model and a wrapper of it."""
    return [model, Delegating(model)]


def test_generate_knows_no_concrete_layer():
    tree = ast.parse(Path(generate_module.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    ours = {m for m in imported if m.startswith("spectralds")}
    assert ours == {"spectralds.errors", "spectralds.layers.registry"}
    assert not any(isinstance(node, ast.Name) and node.id == "hasattr" for node in ast.walk(tree))


@pytest.mark.parametrize("pattern", [("test_ema",), ("test_ema", "attn", "lds")])
def test_a_new_layer_decodes_prompts_of_different_lengths_as_each_alone(pattern):
    model = tiny_lm(pattern)
    batch = prompts()
    out = generate(model, batch, 10)
    assert all(torch.equal(o, generate(model, p[None], 10)[0]) for o, p in zip(out, batch, strict=True))
    with torch.inference_mode():  # the same through merge_states: prompts prefilled apart, then merged
        merged = merge_prefills(model, [model.prefill(p[None])[1] for p in batch])
        logits, padded = prefill_prompts(model, batch)
        for _ in range(6):
            token = logits.argmax(-1)
            (logits, padded), (merged_logits, merged) = model.step(token, padded), model.step(token, merged)
            torch.testing.assert_close(merged_logits, logits, rtol=1e-5, atol=1e-6)


def static_decode(model, states, logits, steps: int) -> torch.Tensor:
    """What GraphedStep does on a GPU, eagerly: fixed-shape states, each step copied into the same tensors."""
    states = _clone(static_states(model, states))
    shapes = [(t.shape, t.dtype) for t in _leaves(states)]
    out = []
    for _ in range(steps):
        out.append(logits)
        logits, new = model.step(logits.argmax(-1), states)
        assert [(t.shape, t.dtype) for t in _leaves(new)] == shapes
        for old, fresh in zip(_leaves(states), _leaves(new), strict=True):
            if fresh is not old:
                old.copy_(fresh)
    return torch.stack(out)


@pytest.mark.parametrize("pattern", [("lds", "lds"), ("test_ema", "attn", "lds"), ("lds_ar", "attn")])
def test_graph_path_states_through_every_wrapper(pattern):
    """The CUDA-graph path's state handling on the CPU. A distilled multi-layer model behind a wrapper
    (lm-eval's, then) once crashed here (one mixer zipped against two states)."""
    model = tiny_lm(pattern)
    for decodable in wrappers(model):
        with torch.inference_mode():
            logits, states = prefill_prompts(decodable, prompts())
            assert graphable(decodable, states)
            static = static_decode(decodable, states, logits, 8)
            eager = []
            for _ in range(8):
                eager.append(logits)
                logits, states = decodable.step(logits.argmax(-1), states)
        torch.testing.assert_close(static, torch.stack(eager), rtol=1e-5, atol=1e-6)


def test_layers_and_models_outside_the_protocol_say_why():
    model = tiny_lm(("test_ema", "stu"))
    with torch.inference_mode():
        states = model.prefill(torch.zeros(2, 5, dtype=torch.long))[1]
    assert not graphable(model, states)
    with pytest.raises(ValueError, match="fixed-size states: STU's decoding state grows"):
        static_states(model, states)
    assert not graphable(ModelWithout(model), states)
    with pytest.raises(ValueError, match="ModelWithout does not list its decoding layers"):
        static_states(ModelWithout(model), states)
    with pytest.raises(ValueError, match="lists 2 layers but its decoding has 1 states"):
        static_states(model, states[:1])

    class NoPadding(ModelWithout):
        def prefill(self, idx):
            return self.model.prefill(idx)

    with pytest.raises(ValueError, match=r"NoPadding.prefill\(idx\) takes no `start`"):
        generate(NoPadding(model), prompts((2, 3)), 2)
    same = prompts((3, 3))  # one length: no padding needed
    assert torch.equal(generate(NoPadding(model), same, 2)[0], generate(model, same, 2)[0])

    class Bare(SequenceLayer):
        pass

    with pytest.raises(ValueError, match="Bare cannot merge"):
        Bare().merge_states([torch.zeros(1)])
    with pytest.raises(ValueError, match="Bare's decoding state grows"):
        Bare().static_state(torch.zeros(1))


def test_lm_eval_generates_with_a_new_layer():
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from spectralds.evaluation.lm_eval_backend import SpectraLDSLM

    model = tiny_lm(("test_ema", "attn"), vocab_size=256)
    lm = SpectraLDSLM(model=model, batch_size=4)
    contexts = ["abc", "one, two, three", "x"]  # different lengths: one left-padded batch
    texts = lm.generate_until([Instance("generate_until", {}, (c, {"until": [], "max_gen_toks": 20}), i)
                               for i, c in enumerate(contexts)], disable_tqdm=True)
    for context, text in zip(contexts, texts, strict=True):
        ids = torch.tensor(list(context.encode()))
        alone = generate(model, ids[None], 20)[0, len(ids) :].tolist()
        assert text == bytes(alone).decode("utf-8", errors="replace")
