"""lm-evaluation-harness backend: any spectralds language model (STU, LDS, attention, hybrids).

Registered as ``spectralds`` in lm-eval's model registry when this module is imported, so both
``lm_eval.simple_evaluate(model="spectralds", model_args="ckpt=...")`` and lm-eval's own CLI through
``python -m spectralds.evaluation.lm_eval_cli --model spectralds --model_args ckpt=...`` find it.
lm-eval does the rest (task loading, few-shot contexts, metrics); this class only scores and generates.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401 (lm-eval's own names first: it skips them once its registry is non-empty)
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from spectralds.data import build_tokenizer
from spectralds.data.corpus import DOC_SEPARATOR
from spectralds.data.tokenizers import Tokenizer
from spectralds.errors import UserError, check_choice, check_int, first_line
from spectralds.generate import generate, set_decode_method

GEN_CHUNK = 32  # tokens generated between checks for a stop sequence


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


def _device(name: str | None) -> torch.device:
    """lm-eval's CLI asks for "cuda:0" unless told otherwise: on a machine without CUDA, use the CPU."""
    if name is None or (name.startswith("cuda") and not torch.cuda.is_available()):
        if name is not None:
            logging.getLogger(__name__).warning("device %s asked for, but CUDA is unavailable: cpu", name)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown device {name!r} ({first_line(e)})") from e


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
    """

    def __init__(
        self,
        ckpt: str | None = None,
        model: torch.nn.Module | None = None,
        tokenizer: str | Tokenizer | None = None,
        batch_size: int | str = 8,
        device: str | None = None,
        decode: str = "futurefill",
        seed: int | str = 1234,
        max_batch_size: Any = None,  # lm-eval passes it to every backend; only for batch_size "auto"
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:  # a misspelt model_args key would otherwise be ignored without a word
            raise UserError(f"unknown spectralds model argument(s): {', '.join(sorted(unknown))}; "
                            "expected ckpt, tokenizer, batch_size, device, decode, seed")
        if (ckpt is None) == (model is None):
            raise UserError("give the spectralds backend exactly one of ckpt=PATH or model=<module>")
        if str(batch_size).startswith("auto"):
            raise UserError("batch_size 'auto' is not supported by the spectralds backend; give a number")
        self.batch_size = _as_int("batch_size", batch_size)
        self.decode = check_choice("decode", decode, ("futurefill", "naive"))
        self.seed = _as_int("seed", seed, minimum=0)
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
            self._device = _device(device)
        self.model = model.to(self._device).eval()
        set_decode_method(self.model, self.decode)
        self.max_length = int(self.model.seq_len)
        # Documents in our training streams are separated by DOC_SEPARATOR, so its last token is what
        # precedes a document's first token: the natural "beginning of text" for an empty context.
        self._prefix = self.tok.encode(DOC_SEPARATOR)[-1]

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
        """One full forward per batch; requests longest first so each batch pads little."""
        for _, _, cont in requests:
            if not 0 < len(cont) <= self.max_length:
                raise UserError(
                    f"a continuation of {len(cont)} tokens does not fit the context of {self.max_length}"
                )
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1]) - len(r[2]), tuple(r[1] + r[2])))
        results: list[tuple[float, bool]] = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood")
        for batch in collator.get_batched(n=self.batch_size):
            # The last seq_len tokens of context + continuation, minus the final one (it is only a target).
            inputs = [(ctx + cont)[-(self.max_length + 1) :][:-1] for _, ctx, cont in batch]
            width = max(len(x) for x in inputs)
            # Right padding is safe: every layer is causal, so padding never reaches earlier positions.
            padded = torch.zeros(len(batch), width, dtype=torch.long)
            for i, x in enumerate(inputs):
                padded[i, : len(x)] = torch.tensor(x)
            logprobs = F.log_softmax(self.model(padded.to(self._device)).float(), dim=-1).cpu()
            for i, (key, _, cont) in enumerate(batch):
                end = len(inputs[i])
                rows = logprobs[i, end - len(cont) : end]
                target = torch.tensor(cont)
                logprob = float(rows.gather(1, target[:, None]).sum())
                answer = (logprob, bool((rows.argmax(-1) == target).all()))
                results.append(answer)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
                bar.update(1)
        bar.close()
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
        collator = Collator(encoded, sort_fn=lambda r: -len(r[1]), group_fn=lambda r: r[2],
                            group_by="gen_kwargs")
        results: list[str] = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for batch in collator.get_batched(n=self.batch_size):
            kwargs = batch[0][2]
            until = handle_stop_sequences(kwargs.get("until"), eos=None)
            max_new = min(_as_int("max_gen_toks", kwargs.get("max_gen_toks", 256)), self.max_length - 1)
            # As in lm-eval's HF backend: do_sample decides; unset, a temperature above 0 means sampling.
            given = float(kwargs.get("temperature", 0.0) or 0.0)
            do_sample = bool(kwargs["do_sample"]) if "do_sample" in kwargs else given > 0
            temperature = (given or 1.0) if do_sample else 0.0
            top_k = kwargs.get("top_k")
            # Prompts are left-truncated so prompt + generation fits the model's context.
            keep = self.max_length - max_new
            prompts = [torch.tensor(ids[-keep:] or [self._prefix]) for _, ids, _ in batch]
            texts = self._generate(prompts, max_new, until, temperature, int(top_k) if top_k else None,
                                   generator)
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
