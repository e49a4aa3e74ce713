"""`SpectralDSForCausalLM`: a spectralds LanguageModel as a transformers causal LM.

The wrapped `LanguageModel` runs every forward, prefill and decoding step itself, so logits are ours
bit for bit. What transformers needs on top:

* generation carries the model's own per-layer decoding states (`SpectralDSCache`): the first call of
  `generate` prefills the prompt, every later one feeds only the new token to `LanguageModel.step`,
  so an LDS decodes in O(1) per token (no transformers KV cache is ever built);
* a left-padded batch (an attention mask of zeros then ones per row) becomes `start`, each row's first
  real token; any other mask is refused in one line;
* transformers 5 loads on the meta device and leaves every non-persistent buffer as empty memory, so
  the model is built on the CPU and its fixed buffers (the spectral filters) are refilled afterwards.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from spectralds.errors import UserError
from spectralds.interop.hf_config import SpectralDSConfig


class SpectralDSCache:
    """The LanguageModel's decoding states (one per block, as `prefill` / `step` return them) and how
    many positions they have seen. Nothing in it grows with the position for LDS layers."""

    is_compileable = False

    def __init__(self, states: list[Any], seen: int) -> None:
        self.states, self.seen = states, seen

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen


def padding_start(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Each row's first real position of a left-padded mask, (batch,) long; None when nothing is padded.

    Only left padding can be expressed: a spectral layer sees every earlier position, so a gap inside
    a row has no meaning for it.
    """
    if attention_mask is None:
        return None
    if attention_mask.ndim != 2:
        raise UserError(f"attention_mask must be (batch, tokens), got shape {tuple(attention_mask.shape)}")
    real = attention_mask.bool()
    start = (~real).sum(dim=1)
    positions = torch.arange(real.shape[1], device=real.device)
    if not bool((real == (positions[None] >= start[:, None])).all()):
        raise UserError("attention_mask must be left padding (zeros, then ones, in every row): spectralds "
                        "models take no other mask")
    if bool((start >= real.shape[1]).any()):
        raise UserError("a row of the attention_mask has no real token")
    return start if bool(start.any()) else None


class SpectralDSForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SpectralDSConfig
    base_model_prefix = "lm"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]

    def __init__(self, config: SpectralDSConfig) -> None:
        super().__init__(config)
        from spectralds.layers import restore_layers
        from spectralds.models.lm import LanguageModel

        kwargs = {**config.lm_kwargs, "compile": False}
        # Built on the CPU whatever device transformers loads under: the filters are computed here.
        with torch.device("cpu"):
            self.lm = LanguageModel(**kwargs)
            restore_layers(self.lm, config.layer_specs)
        # transformers builds under the dtype it loads in (its default dtype meanwhile); layers that make
        # their parameters in their own run dtype (LDS) are cast like the rest, as `model.to(dtype)` did
        # to the exported model (an LDS keeps its float64 system; filters stay at least float32).
        self.lm.to(torch.get_default_dtype())
        self._fixed_buffers = {
            name: buffer.detach().clone()
            for name, buffer in self.lm.named_buffers()
            if not self._is_persistent(name)
        }
        # transformers 5 ties by {target: source}; LanguageModel shares the tensor itself already.
        self._tied_weights_keys = {"lm.head.weight": "lm.embed.weight"} if config.tie_word_embeddings else {}
        self.post_init()

    def _is_persistent(self, name: str) -> bool:
        owner, _, leaf = name.rpartition(".")
        module = self.lm.get_submodule(owner) if owner else self.lm
        return leaf not in module._non_persistent_buffers_set

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Weights all come from model.safetensors; only the fixed (non-persistent) buffers, which
        transformers 5 leaves as empty memory, are put back (it calls this for each module holding one)."""
        prefix = next((name for name, sub in self.lm.named_modules() if sub is module), None)
        if prefix is None:
            return
        for leaf in module._non_persistent_buffers_set:
            saved = self._fixed_buffers[f"{prefix}.{leaf}" if prefix else leaf]
            current = module._buffers[leaf]
            module._buffers[leaf] = saved.to(device=current.device, dtype=current.dtype)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the states are the model's own (SpectralDSCache), not a transformers Cache

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.lm.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm.head

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: SpectralDSCache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        **unused: Any,
    ) -> CausalLMOutputWithPast:
        """Logits of every position (or the last `logits_to_keep`); with use_cache=True, also the
        decoding states after the last position. Given a cache, input_ids are the new tokens only.

        use_cache None (a plain scoring call, lm-eval's) builds no states: they would only cost time.
        """
        for name in ("inputs_embeds", "output_attentions", "output_hidden_states"):
            if unused.get(name) is not None and unused[name] is not False:
                raise UserError(f"{name} is not supported by spectralds models: give input_ids")
        if cache is not None:
            logits, cache = self._decode(input_ids, attention_mask, cache)
        else:
            start = padding_start(attention_mask)
            if use_cache and logits_to_keep == 1:  # generate's prefill: the last position is all it reads
                last, states = self.lm.prefill(input_ids, start=start)
                logits = last[:, None]
            else:
                logits = self.lm(input_ids, start=start)
                states = self.lm.prefill(input_ids, start=start)[1] if use_cache else None
            cache = None if states is None else SpectralDSCache(states, input_ids.shape[1])
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def _reorder_cache(self, cache: SpectralDSCache, beam_idx: torch.Tensor) -> SpectralDSCache:
        raise UserError("beam search is not supported by spectralds models: use greedy or sampling")

    def _decode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: SpectralDSCache
    ) -> tuple[torch.Tensor, SpectralDSCache]:
        """New tokens through `LanguageModel.step`, one at a time, from the cache's states."""
        new = input_ids.shape[1]
        if attention_mask is not None and not bool(attention_mask[:, -new:].bool().all()):
            raise UserError("attention_mask must be left padding: a token after the prompt is masked")
        if cache.seen + new > self.lm.seq_len:
            raise UserError(f"{cache.seen + new} tokens exceed the model's context of {self.lm.seq_len}")
        states, outs = cache.states, []
        for t in range(new):
            logits, states = self.lm.step(input_ids[:, t], states)
            outs.append(logits)
        return torch.stack(outs, dim=1), SpectralDSCache(states, cache.seen + new)


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM / AutoTokenizer know model_type "spectralds" (then a
directory loads without trust_remote_code)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from spectralds.interop.hf_tokenizer import SpectralDSTokenizer

    AutoConfig.register(SpectralDSConfig.model_type, SpectralDSConfig, exist_ok=True)
    AutoModelForCausalLM.register(SpectralDSConfig, SpectralDSForCausalLM, exist_ok=True)
    AutoTokenizer.register(SpectralDSConfig, fast_tokenizer_class=SpectralDSTokenizer, exist_ok=True)


register()
