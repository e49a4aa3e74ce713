"""Multiple choice from one shared context: each context run once, every choice then scored as a batched,
right-padded continuation from the context's decoding state.

lm-eval asks for one (context, continuation) pair per choice, the context repeated, so scoring each pair with
a full forward reads the context once per choice. Here the requests that share a context (a question and its
choices) form a group; the contexts of several groups are prefilled as one left-padded batch
(`generate.prefill_prompts`), and all choices continue from their states in one pass, outputs only
(`LanguageModel.prefill(states=..., all_logits=True, keep_state=False)`), each state serving its choices' rows
without a copy. The scores are those of the full forwards, to float rounding. A request whose context +
continuation exceeds the model's window is not grouped: it keeps lm-eval's left truncation (the caller's full
forward).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from spectralds.generate import merge_prefills, prefill_prompts
from spectralds.layers.positions import at_least_float32
from spectralds.layers.registry import SequenceLayer

Request = tuple[object, list[int], list[int]]  # lm-eval's (cache key, context tokens, continuation tokens)


def can_continue(model: object) -> bool:
    """Whether the model prefills from earlier states, outputs only, and returns every position's logits (a
    spectralds LanguageModel does; a module with only `forward` is scored by full forwards)."""
    prefill = getattr(model, "prefill", None)
    if prefill is None or not hasattr(model, "decoding_layers"):
        return False
    parameters = inspect.signature(prefill).parameters
    return all(name in parameters for name in ("start", "states", "all_logits", "keep_state"))


def shared_contexts(
    requests: Sequence[Request], max_length: int, min_context: int
) -> tuple[list[list[int]], list[int]]:
    """Indices of the requests in groups sharing one context (two or more requests, a context of at least
    `min_context` tokens, context + continuation inside the window: nothing to truncate), and of the rest,
    each in request order."""
    by_context: dict[tuple[int, ...], list[int]] = {}
    rest = []
    for index, (_, context, continuation) in enumerate(requests):
        fits = len(context) + len(continuation) - 1 <= max_length  # the tokens a forward would read
        if fits and len(context) >= max(1, min_context):
            by_context.setdefault(tuple(context), []).append(index)
        else:
            rest.append(index)
    groups = []
    for members in by_context.values():
        if len(members) >= 2:
            groups.append(members)
        else:
            rest.extend(members)
    return groups, sorted(rest)


def batches(groups: list[list[int]], requests: Sequence[Request], rows: int) -> Iterator[list[list[int]]]:
    """Groups in batches of about `rows` continuations (at least one group each), longest contexts first so
    a batch pads little."""
    ordered = sorted(groups, key=lambda g: -len(requests[g[0]][1]))
    batch: list[list[int]] = []
    for group in ordered:
        width = max(len(group), *(len(g) for g in batch)) if batch else len(group)
        if batch and width * (len(batch) + 1) > rows:
            yield batch
            batch = []
        batch.append(group)
    if batch:
        yield batch


@torch.inference_mode()
def score_groups(
    model: torch.nn.Module, requests: Sequence[Request], groups: list[list[int]], device: torch.device
) -> dict[int, tuple[float, bool]]:
    """{request index: (loglikelihood, is_greedy)} of the requests in `groups`, scored together.

    The G contexts are prefilled as one batch; row k * G + g of the continuation holds group g's k-th
    choice (n rows per group, n: the most choices of a group; a group with fewer leaves rows unused), all
    choices but their last tokens one right-padded pass from the G states, outputs only (`keep_state=
    False`): each layer continues row r from state row r % G (`SequenceLayer.continues_repeated`), or,
    where one cannot, the states are repeated n times first (`generate.merge_prefills`).
    The logits predicting a continuation's first token are those of its context's last position.
    """
    contexts = [torch.tensor(requests[g[0]][1], device=device) for g in groups]
    with stu_decoding(model, scoring_method(min(len(c) for c in contexts), model.seq_len)):
        return _score(model, requests, groups, contexts, device)


def _score(
    model: torch.nn.Module, requests: Sequence[Request], groups: list[list[int]],
    contexts: list[torch.Tensor], device: torch.device,
) -> dict[int, tuple[float, bool]]:
    last, states = prefill_prompts(model, contexts)  # (G, vocab): what predicts each first token
    count, choices = len(groups), max(len(g) for g in groups)
    width = max(len(requests[i][2]) for g in groups for i in g) - 1
    logits = last[None].expand(choices, -1, -1).reshape(choices * count, 1, -1)
    if width > 0:  # continuations of one token need nothing more
        tokens = torch.zeros(choices * count, width, dtype=torch.long)
        for g, group in enumerate(groups):
            for k, index in enumerate(group):
                tail = requests[index][2][:-1]
                tokens[k * count + g, : len(tail)] = torch.tensor(tail, dtype=torch.long)
        if not all(getattr(layer, "continues_repeated", bool)() for layer in model.decoding_layers()):
            states = merge_prefills(model, [states] * choices)  # a copy of each state per choice
        more, _ = model.prefill(tokens.to(device), states=states, all_logits=True, keep_state=False)
        logits = torch.cat([logits, more], 1)
    logprobs = log_probabilities(logits)
    return {index: continuation_score(logprobs[k * count + g], requests[index][2])
            for g, group in enumerate(groups) for k, index in enumerate(group)}


def log_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax on the CPU, half precision in float32 and float64 kept (a float64 model's scores)."""
    return F.log_softmax(at_least_float32(logits), dim=-1).cpu()


def scoring_method(context: int, window: int) -> str:
    """How STU layers score continuations after a context (both exact, outputs only): FutureFill's
    prefill adds each context to every later position of the window, a cost that grows with the window;
    naive decoding's continuation convolves each context again, a cost that grows with the context.
    FutureFill when the window is at most twice the context."""
    return "futurefill" if window <= 2 * context else "naive"


@contextmanager
def stu_decoding(model: torch.nn.Module, method: str) -> Iterator[None]:
    """Every STU layer decoding by `method` inside the block, each back to its own method after it."""
    layers = [m for m in model.modules() if isinstance(m, SequenceLayer) and method in m.decode_methods]
    before = [layer.decode_method for layer in layers]
    for layer in layers:
        layer.set_decode_method(method)
    try:
        yield
    finally:
        for layer, own in zip(layers, before, strict=True):
            layer.set_decode_method(own)


def continuation_score(logprobs: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
    """(sum of the continuation's log-probabilities, whether each token is the argmax) from the rows
    (positions, vocab) of log-probabilities whose first len(continuation) rows predict it."""
    rows = logprobs[: len(continuation)]
    target = torch.tensor(continuation)
    return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())
