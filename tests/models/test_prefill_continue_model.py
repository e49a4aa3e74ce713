"""`LanguageModel.prefill(idx, states=..., all_logits=...)`, float64: a prompt in chunks gives one prefill's
logits and states, every position's logits are `forward`'s, and one context state repeated for a batch of
continuations (the multiple-choice pattern) scores each as if run alone; lm-eval's wrapper delegates it."""

import pytest
import torch
import torch.nn.functional as F
from lm_helpers import float64_lm

from spectralds.errors import UserError
from spectralds.generate import merge_prefills
from spectralds.layers import SequenceLayer, register_layer
from spectralds.models import LanguageModel

PATTERNS = [("stu", "attn"), ("stu_t", "lds"), ("lds", "attn"), ("lds_ar", "stu")]
TOL = 1e-10


def tiny_lm(pattern, decode: str = "futurefill") -> LanguageModel:
    return float64_lm(pattern, decode, seq_len=48, window=6)


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 32, (batch, length), generator=torch.Generator().manual_seed(seed))


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and (a - b).abs().max().item() <= TOL


@pytest.mark.parametrize("decode", ["futurefill", "naive"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_chunks_give_one_prefill_and_every_position_is_forward(pattern, decode):
    model = tiny_lm(pattern, decode)
    idx = tokens(2, 30)
    with torch.inference_mode():
        last, states = model.prefill(idx)
        every = model(idx)
        cut = [0, 1, 8, 9, 23, 30]
        chunk_states, pieces = None, []
        for a, b in zip(cut[:-1], cut[1:], strict=True):
            logits, chunk_states = model.prefill(idx[:, a:b], states=chunk_states, all_logits=True)
            pieces.append(logits)
        close(torch.cat(pieces, 1), every)
        close(model.prefill(idx, all_logits=True)[0], every)
        close(pieces[-1][:, -1], last)
        token = last.argmax(-1)
        for _ in range(4):
            expected, states = model.step(token, states)
            got, chunk_states = model.step(token, chunk_states)
            close(got, expected)
            token = expected.argmax(-1)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_one_context_state_scores_a_batch_of_continuations_as_each_alone(pattern):
    model = tiny_lm(pattern)
    context, choices = tokens(1, 17, seed=1), tokens(4, 5, seed=2)
    with torch.inference_mode():
        _, state = model.prefill(context)
        _, state = model.prefill(tokens(1, 3, seed=5), states=state)  # a context itself continued
        full_context = torch.cat([context, tokens(1, 3, seed=5)], 1)
        merged = merge_prefills(model, [state] * 4)
        logits, _ = model.prefill(choices, states=merged, all_logits=True)
        for row in range(4):
            alone = model(torch.cat([full_context, choices[row : row + 1]], 1))[:, -5:]
            close(logits[row : row + 1], alone)
    # what a scorer reads: the log-probability of each continuation
    assert F.log_softmax(logits, -1).shape == (4, 5, 32)


@pytest.mark.parametrize("decode", ["futurefill", "naive"])
def test_one_context_state_serves_several_continuations_unchanged(decode):
    """The package's layers leave a state as given: continuing it twice (after a step too) is right both
    times."""
    model = tiny_lm(("stu", "attn", "lds_ar", "stu_t"), decode)
    context = tokens(2, 9, seed=3)
    with torch.inference_mode():
        _, states = model.prefill(context)
        _, states = model.step(tokens(2, 1, seed=4)[:, 0], states)
        prefix = torch.cat([context, tokens(2, 1, seed=4)], 1)
        for seed in (5, 6, 7):
            chunk = tokens(2, 4, seed=seed)
            logits, _ = model.prefill(chunk, states=states, all_logits=True)
            close(logits, model(torch.cat([prefix, chunk], 1))[:, -4:])


def test_bad_continuations_are_one_line_errors():
    model = tiny_lm(("stu", "attn"))
    with torch.inference_mode():
        _, states = model.prefill(tokens(2, 5))
        for call, match in [
            (lambda: model.prefill(tokens(2, 3), torch.tensor([0, 1]), states), "start \\(left padding\\)"),
            (lambda: model.prefill(tokens(3, 3), states=states), "holds 2 sequences but the chunk"),
            (lambda: model.prefill(tokens(2, 3), states=states[:1]), "one state per block \\(2\\), got 1"),
            (lambda: model.prefill(tokens(2, 0), states=states), "at least one token"),
        ]:
            with pytest.raises(UserError, match=match) as info:
                call()
            assert "\n" not in str(info.value)


@register_layer("test_old_prefill")
class OldPrefill(SequenceLayer):
    """A layer written before `state` existed: its own prefill(x, start) and step, nothing else."""

    def __init__(self, dim: int, seq_len: int | None = None) -> None:
        super().__init__()
        self.w = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, x, start=None):
        return self.prefill(x)[0]

    def init_state(self, batch_size, device=None, dtype=None):
        return torch.zeros(batch_size, self.w.in_features, device=device, dtype=dtype)

    def step(self, x_t, state):
        state = 0.5 * state + self.w(x_t)
        return state.tanh(), state

    def prefill(self, x, start=None):
        state, ys = self.init_state(x.shape[0], x.device, x.dtype), []
        for t in range(x.shape[1]):
            y, state = self.step(x[:, t], state)
            ys.append(y)
        return torch.stack(ys, 1), state


def test_a_layer_whose_prefill_takes_no_state_continues_by_its_steps():
    model = tiny_lm(("test_old_prefill", "attn"))
    idx = tokens(2, 14)
    with torch.inference_mode():
        _, states = model.prefill(idx[:, :6])
        logits, _ = model.prefill(idx[:, 6:], states=states, all_logits=True)
        close(logits, model(idx)[:, 6:])
