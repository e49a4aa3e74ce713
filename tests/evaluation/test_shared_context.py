"""Multiple choice from one shared context (`spectralds.evaluation.shared_context`): the context run once and
the choices continued from its state score what one full forward per request scores, for STU, STU-T, LDS,
hybrid and attention models in float64 and float32; requests longer than the window keep lm-eval's left
truncation."""

import random

import pytest
import torch

pytest.importorskip("lm_eval")
from spectralds.evaluation import shared_context as sharing  # noqa: E402
from spectralds.evaluation.lm_eval_backend import SpectraLDSLM  # noqa: E402
from spectralds.models import LanguageModel  # noqa: E402

SEQ = 48
PATTERNS = {"stu_t": ["stu_t"], "stu": ["stu"], "lds": ["lds"], "hybrid": ["stu_t", "attn"],
            "attention": ["attn"], "lds_ar+attn": ["lds_ar", "attn"]}


def tiny_lm(pattern: list[str], dtype: torch.dtype) -> LanguageModel:
    torch.manual_seed(0)
    lds = {"state_dim": 8, "dtype": "float64" if dtype == torch.float64 else "float32"}
    layer_kwargs = {"attn": {"num_heads": 2, "window_size": 12}, "lds": lds, "lds_ar": {**lds, "ar_order": 2}}
    model = LanguageModel(vocab_size=256, dim=16, num_layers=2, layer_pattern=pattern, seq_len=SEQ,
                          num_filters=4, mlp_ratio=2.0, layer_kwargs=layer_kwargs).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ar." in name:  # AR weights start at zero: make them do something
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def multiple_choice(seed: int = 0) -> list[tuple[None, list[int], list[int]]]:
    """Questions of 2-4 choices (1-7 tokens) after contexts of different lengths (in one batch), a question
    whose longest choice overflows the window, lone requests, and contexts shorter than the minimum."""
    rng = random.Random(seed)
    tokens = lambda n: [rng.randrange(256) for _ in range(n)]  # noqa: E731
    requests = []
    for context_len, choices in [(20, 4), (33, 2), (7, 3), (40, 4), (3, 2), (1, 3)]:
        context = tokens(context_len)
        requests += [(None, context, tokens(rng.randint(1, 7))) for _ in range(choices)]
    overflow = tokens(45)  # 45 + 5 - 1 > 48: left-truncated; its shorter choices still share the context
    requests += [(None, overflow, tokens(5)), (None, overflow, tokens(1)), (None, overflow, tokens(2))]
    requests += [(None, tokens(30), tokens(4)), (None, tokens(60), tokens(3))]  # alone; one past the window
    rng.shuffle(requests)
    return requests


def full_forward_score(model, context, continuation):
    """The independent reference: one forward over the last SEQ tokens of context + continuation."""
    window = (context + continuation)[-(SEQ + 1):]
    with torch.no_grad():
        logits = model(torch.tensor([window[:-1]]))[0, -len(continuation):]
    logprobs = torch.log_softmax(logits.double(), -1)
    target = torch.tensor(continuation)
    return float(logprobs.gather(1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", list(PATTERNS))
def test_shared_context_scores_equal_full_forwards(kind, dtype, monkeypatch):
    model = tiny_lm(PATTERNS[kind], dtype)
    requests = multiple_choice()
    grouped = []
    score_groups = sharing.score_groups

    def spy(model, requests, groups, device):
        grouped.extend(i for g in groups for i in g)
        return score_groups(model, requests, groups, device)

    monkeypatch.setattr(sharing, "score_groups", spy)
    shared = SpectraLDSLM(model=model, batch_size=6, shared_context=2)._loglikelihood_tokens(requests)
    alone = SpectraLDSLM(model=model, batch_size=6, shared_context=0)._loglikelihood_tokens(requests)
    # 4 + 2 + 3 + 4 + 2 choices and the overflowing question's two that fit (the 1-token context: too short)
    assert len(grouped) == 17 and sorted(grouped) == sorted(set(grouped))
    overflowing = [i for i, (_, c, x) in enumerate(requests) if len(c) + len(x) - 1 > SEQ]
    assert len(overflowing) == 2 and not set(overflowing) & set(grouped)
    rel = 1e-10 if dtype == torch.float64 else 1e-5
    for (a, greedy_a), (b, greedy_b) in zip(shared, alone, strict=True):
        assert a == pytest.approx(b, rel=rel) and greedy_a == greedy_b
    for (_, context, continuation), (score, greedy) in zip(requests, shared, strict=True):
        expected, expected_greedy = full_forward_score(model, context, continuation)
        assert score == pytest.approx(expected, rel=rel) and greedy == expected_greedy


def test_long_requests_are_left_truncated_as_lm_eval_does(monkeypatch):
    """lm-eval's own models keep the last max_length tokens of context + continuation (minus the final
    one): a request past the window is scored from exactly that window, shared context or not."""
    model = tiny_lm(["stu_t", "attn"], torch.float64)
    rng = random.Random(1)
    context = [rng.randrange(256) for _ in range(70)]
    requests = [(None, context, [rng.randrange(256) for _ in range(n)]) for n in (3, 9, 1)]
    lm = SpectraLDSLM(model=model, batch_size=4)
    for (_, ctx, cont), (score, greedy) in zip(requests, lm._loglikelihood_tokens(requests), strict=True):
        window = (ctx + cont)[-(SEQ + 1):]
        assert len(window) == SEQ + 1 and window[-len(cont):] == cont
        expected = full_forward_score(model, ctx, cont)
        assert score == pytest.approx(expected[0], rel=1e-12) and greedy == expected[1]
    groups, rest = sharing.shared_contexts(requests, SEQ, 1)
    assert groups == [] and rest == [0, 1, 2]


def test_a_module_without_continuation_is_scored_by_full_forwards():
    """A user's module whose prefill takes no states (or that has none) is scored by forwards alone."""

    class ForwardOnly(torch.nn.Module):
        seq_len = SEQ

        def __init__(self):
            super().__init__()
            self.inner = tiny_lm(["stu_t"], torch.float64)

        def forward(self, idx):
            return self.inner(idx)

    assert sharing.can_continue(tiny_lm(["lds"], torch.float64))
    assert not sharing.can_continue(ForwardOnly())
    requests = multiple_choice()[:12]
    got = SpectraLDSLM(model=ForwardOnly(), batch_size=5)._loglikelihood_tokens(requests)
    model = ForwardOnly().inner
    for (_, context, continuation), (score, _) in zip(requests, got, strict=True):
        assert score == pytest.approx(full_forward_score(model, context, continuation)[0], rel=1e-12)


def test_batches_hold_about_the_rows_asked_for():
    requests = [(None, [1] * n, [2]) for n in (5, 9, 9, 7, 3, 3)]
    groups = [[0], [1, 2], [3], [4, 5]]
    batches = list(sharing.batches(groups, requests, rows=4))
    assert [g for b in batches for g in b] == [[1, 2], [3], [0], [4, 5]]  # longest context first
    assert all(max(len(g) for g in b) * len(b) <= 4 for b in batches)
    assert list(sharing.batches([[0, 1, 2]], requests, rows=2)) == [[[0, 1, 2]]]  # a group is never split


def test_stu_layers_score_by_the_cheaper_exact_method_and_get_theirs_back():
    model = tiny_lm(["stu_t", "stu"], torch.float64)
    assert sharing.scoring_method(context=24, window=48) == "futurefill"  # the window at most twice it
    assert sharing.scoring_method(context=23, window=48) == "naive"
    stus = [m for m in model.modules() if getattr(m, "decode_methods", ())]
    assert len(stus) == 2 and {m.decode_method for m in stus} == {"futurefill"}
    with sharing.stu_decoding(model, "naive"):
        assert {m.decode_method for m in stus} == {"naive"}
    assert {m.decode_method for m in stus} == {"futurefill"}


@pytest.mark.parametrize("value, expected", [(-1, "shared_context must be >= 0"), ("many", "shared_context")])
def test_a_bad_shared_context_is_a_one_line_error(value, expected):
    from spectralds.errors import UserError

    with pytest.raises(UserError, match=expected) as info:
        SpectraLDSLM(model=tiny_lm(["lds"], torch.float32), shared_context=value)
    assert "\n" not in str(info.value)
