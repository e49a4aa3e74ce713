"""lm-evaluation-harness backend: any spectralds language model (STU, LDS, attention, hybrids).

Registered as ``spectralds`` in lm-eval's model registry when this module is imported, so both
``lm_eval.simple_evaluate(model="spectralds", model_args="ckpt=...")`` and lm-eval's own CLI through
``python -m spectralds.evaluation.lm_eval_cli --model spectralds --model_args ckpt=...`` find it.
lm-eval does the rest (task loading, few-shot contexts, metrics); this class only scores and generates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401 (lm-eval's own names first: it skips them once its registry is non-empty)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from spectralds.data import build_tokenizer
from spectralds.data.corpus import DOC_SEPARATOR
from spectralds.data.tokenizers import Tokenizer
from spectralds.errors import UserError, check_choice, check_int
from spectralds.evaluation import data_parallel
from spectralds.evaluation import shared_context as sharing
from spectralds.evaluation.backend_args import generation_settings, merge_model_args, resolve_device
from spectralds.generate import generate, set_decode_method

GEN_CHUNK = 32  # tokens generated between checks for a stop sequence
SHARED_CONTEXT = 1  # the shortest context scored once for all requests sharing it (see shared_context)


def load_language_model(ckpt: str | Path) -> tuple[torch.nn.Module, str]:
    """The model in a spectralds checkpoint and its tokenizer spec; one-line errors for anything else."""
    from spectralds.checkpoint_io import load_model, read_checkpoint, tokenizer_spec

    checkpoint = read_checkpoint(ckpt)
    name = checkpoint.get("spectralds_model", "LanguageModel")
    if name != "LanguageModel":
        raise UserError(f"checkpoint {ckpt} holds a {name}, not a language model: nothing to evaluate")
    if "vocab_size" not in checkpoint.get("hyper_parameters", {}):
        raise UserError(f"checkpoint {ckpt} is not a spectralds language model (no vocab_size)")
    return load_model(ckpt, checkpoint=checkpoint), tokenizer_spec(checkpoint)


def _as_int(name: str, value: Any, minimum: int = 1) -> int:
    # lm-eval's CLI passes model_args and --batch_size as strings
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    return check_int(name, value, minimum=minimum)


@register_model("spectralds")
class SpectraLDSLM(TemplateLM):
    """Scores and generates with a spectralds LanguageModel (or any module with the same interface:
    ``forward(tokens) -> logits``, ``seq_len``, ``prefill``/``step``).

    ckpt: a checkpoint path; or model: the module itself (then tokenizer defaults to "byte").
    tokenizer: a spec for `spectralds.data.build_tokenizer` or a Tokenizer, overriding the checkpoint's
    (needed for "bpe" models, whose tokenizer.json lives in the training cache).
    decode: how STU layers generate ("futurefill" or "naive"); LDS layers always step their state.
    shared_context: requests sharing a context of at least this many tokens (the choices of a question) are
    scored from one run of it (`spectralds.evaluation.shared_context`); 0: every request a full forward.

    Under torchrun or in a DDP run, lm-eval gives each rank its share of the documents through the
    `rank` / `world_size` / gather hooks below (`spectralds.evaluation.data_parallel`).
    """

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> SpectraLDSLM:
        from lm_eval.utils import simple_parse_args_string

        return cls(**merge_model_args(simple_parse_args_string(arg_string), additional_config))

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> SpectraLDSLM:
        return cls(**merge_model_args(arg_dict, additional_config))

    def __init__(
        self,
        ckpt: str | None = None,
        model: torch.nn.Module | None = None,
        tokenizer: str | Tokenizer | None = None,
        batch_size: int | str = 8,
        device: str | None = None,
        decode: str = "futurefill",
        seed: int | str = 1234,
        shared_context: int | str = SHARED_CONTEXT,
        max_batch_size: Any = None,  # lm-eval passes it to every backend; only for batch_size "auto"
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:  # a misspelt model_args key would otherwise be ignored without a word
            raise UserError(f"unknown spectralds model argument(s): {', '.join(sorted(unknown))}; "
                            "expected ckpt, tokenizer, batch_size, device, decode, seed, shared_context")
        if (ckpt is None) == (model is None):
            raise UserError("give the spectralds backend exactly one of ckpt=PATH or model=<module>")
        if str(batch_size).startswith("auto"):
            raise UserError("batch_size 'auto' is not supported by the spectralds backend; give a number")
        self.batch_size = _as_int("batch_size", batch_size)
        self.decode = check_choice("decode", decode, ("futurefill", "naive"))
        self.seed = _as_int("seed", seed, minimum=0)
        self.shared_context = _as_int("shared_context", shared_context, minimum=0)
        spec: str | Tokenizer = "byte"
        if ckpt is not None:
            model, spec = load_language_model(ckpt)
        if tokenizer is not None:
            spec = tokenizer
        if spec == "bpe":
            raise UserError(
                "this model used a BPE tokenizer trained on its corpus: pass tokenizer=PATH/tokenizer.json"
            )
        self.tok = spec if isinstance(spec, Tokenizer) else build_tokenizer(spec)
        vocab = dict(getattr(model, "hparams", {})).get("vocab_size")
        if vocab is not None and self.tok.vocab_size > vocab:
            raise UserError(f"the tokenizer has {self.tok.vocab_size} tokens but the model only {vocab}")
        if device is None and ckpt is None:  # a module given as is stays where it is
            self._device = next(iter(model.parameters()), torch.empty(0)).device
        else:
            self._device = data_parallel.local_device(resolve_device(device))
        # Under torchrun or a DDP run, lm-eval hands each rank its share of the documents (see rank).
        self.ranks = data_parallel.join(self._device)
        self._rank, self._world_size = self.ranks.rank, self.ranks.world_size
        self.model = model.to(self._device).eval()
        set_decode_method(self.model, self.decode)
        self.max_length = int(self.model.seq_len)
        # Documents in our training streams are separated by DOC_SEPARATOR, so its last token is what
        # precedes a document's first token: the natural "beginning of text" for an empty context.
        self._prefix = self.tok.encode(DOC_SEPARATOR)[-1]

    # ---- data parallelism: the hooks lm-eval's evaluator calls when world_size > 1 ------------------
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return data_parallel.all_gather(tensor, self.ranks)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        return data_parallel.gather_object(obj, self.ranks, dst)

    def barrier(self) -> None:
        data_parallel.barrier(self.ranks)

    # ---- tokenization (TemplateLM plumbing) ---------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._prefix

    @property
    def tokenizer_name(self) -> str:
        return self.tok.fingerprint

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tok.encode(string)  # our tokenizers add no special tokens

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens)

    # ---- scoring ------------------------------------------------------------------------------
    @torch.inference_mode()
    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        """Requests sharing a context (multiple choice) scored from one run of it (`shared_context`); the
        others by full forwards in batches, longest first so each batch pads little."""
        for _, _, cont in requests:
            if not 0 < len(cont) <= self.max_length:
                raise UserError(
                    f"a continuation of {len(cont)} tokens does not fit the context of {self.max_length}"
                )
        groups: list[list[int]] = []
        rest = list(range(len(requests)))
        if self.shared_context and sharing.can_continue(self.model):
            groups, rest = sharing.shared_contexts(requests, self.max_length, self.shared_context)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank > 0, desc="loglikelihood")
        answers: dict[int, tuple[float, bool]] = {}
        for batch in sharing.batches(groups, requests, self.batch_size):
            answers.update(sharing.score_groups(self.model, requests, batch, self._device))
            bar.update(sum(len(g) for g in batch))
        answers.update(zip(rest, self._full_forwards([requests[i] for i in rest], bar), strict=True))
        bar.close()
        results = [answers[i] for i in range(len(requests))]
        for (key, _, _), answer in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def _full_forwards(self, requests: list[Any], bar: tqdm) -> list[tuple[float, bool]]:
        """One full forward per batch of requests, each left-truncated to the window as lm-eval's own
        models do: the last seq_len tokens of context + continuation, minus the final one (a target)."""
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1]) - len(r[2]), tuple(r[1] + r[2])))
        results: list[tuple[float, bool]] = []
        for batch in collator.get_batched(n=self.batch_size):
            inputs = [(ctx + cont)[-(self.max_length + 1) :][:-1] for _, ctx, cont in batch]
            width = max(len(x) for x in inputs)
            # Right padding is safe: every layer is causal, so padding never reaches earlier positions.
            padded = torch.zeros(len(batch), width, dtype=torch.long)
            for i, x in enumerate(inputs):
                padded[i, : len(x)] = torch.tensor(x)
            logprobs = sharing.log_probabilities(self.model(padded.to(self._device)))
            for i, (_, _, cont) in enumerate(batch):
                end = len(inputs[i])
                results.append(sharing.continuation_score(logprobs[i, end - len(cont) : end], cont))
                bar.update(1)
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each text scored in disjoint windows of seq_len predictions (lm-eval's rolling windows)."""
        windows, owner = [], []
        for index, request in enumerate(requests):
            tokens = self.tok_encode(request.args[0])
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(tokens, self._prefix, self.max_length, context_len=1),
            ):
                windows.append((None, ctx, cont))
                owner.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, scores, strict=True):
            totals[index] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    # ---- generation ---------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """spectralds.generate.generate over each batch of prompts (any lengths), stopped at `until`."""
        generator = torch.Generator(device=self._device).manual_seed(self.seed)
        encoded = [(context, self.tok_encode(context), dict(kwargs)) for context, kwargs in
                   (r.args for r in requests)]
        for _, _, kwargs in encoded:  # every request's settings checked before any is generated
            generation_settings(kwargs)
        collator = Collator(encoded, sort_fn=lambda r: -len(r[1]), group_fn=lambda r: r[2],
                            group_by="gen_kwargs")
        results: list[str] = []
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank > 0, desc="generate_until")
        for batch in collator.get_batched(n=self.batch_size):
            kwargs = batch[0][2]
            settings = generation_settings(kwargs)
            until = handle_stop_sequences(settings.until, eos=None)
            max_new = min(settings.max_gen_toks, self.max_length - 1)
            temperature, top_k = settings.temperature, settings.top_k
            # Prompts are left-truncated so prompt + generation fits the model's context.
            keep = self.max_length - max_new
            prompts = [torch.tensor(ids[-keep:] or [self._prefix]) for _, ids, _ in batch]
            texts = self._generate(prompts, max_new, until, temperature, top_k, generator)
            for i, (context, _, _) in enumerate(batch):
                results.append(texts[i])
                self.cache_hook.add_partial("generate_until", (context, kwargs), texts[i])
                bar.update(1)
        bar.close()
        return collator.get_original(results)

    @torch.inference_mode()
    def _generate(
        self, prompts: list[torch.Tensor], max_new: int, until: list[str], temperature: float,
        top_k: int | None, generator: torch.Generator,
    ) -> list[str]:
        """Generate for prompts of any lengths as one batch (`generate` pads them on the left), in chunks,
        stopping once every row has produced a stop sequence (or max_new tokens).

        Chunking only saves work: tokens after a stop sequence never influence the ones before it.
        """
        rows = [p.to(self._device) for p in prompts]
        lengths, done = [len(p) for p in prompts], 0
        while done < max_new:
            step = min(GEN_CHUNK, max_new - done)
            # only ids the tokenizer can decode (a vocabulary padded past the tokenizer's)
            rows = generate(self.model, rows, step, temperature, top_k, generator,
                            vocab_size=self.tok.vocab_size)
            done += step
            texts = [self.tok_decode(row[n:].tolist()) for row, n in zip(rows, lengths, strict=True)]
            if all(any(stop in text for stop in until) for text in texts):
                break
        return [_cut(text, until) for text in texts]


def _cut(text: str, until: list[str]) -> str:
    """The text up to its first stop sequence."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text
