"""`SpectralDSConfig`: a transformers config carrying a LanguageModel's arguments and its layer specs.

The layer specs (`spectralds.layers.layer_specs`) rebuild swapped (LDS) and pruned layers exactly as
the model was saved, the same way a checkpoint's `spectralds_layers` does.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

MODEL_TYPE = "spectralds"


class SpectralDSConfig(PretrainedConfig):
    """lm_kwargs: `LanguageModel(**lm_kwargs)`; layer_specs: {module path: build_layer spec}."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        lm_kwargs: dict[str, Any] | None = None,
        layer_specs: dict[str, dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        self.lm_kwargs = dict(lm_kwargs or {})
        self.layer_specs = {path: dict(spec) for path, spec in (layer_specs or {}).items()}
        # What generic tools read (lm-eval's max_length, resize_token_embeddings, generate's bounds).
        self.vocab_size = self.lm_kwargs.get("vocab_size")
        self.hidden_size = self.lm_kwargs.get("dim")
        self.num_hidden_layers = self.lm_kwargs.get("num_layers")
        self.max_position_embeddings = self.lm_kwargs.get("seq_len")
        kwargs.setdefault("tie_word_embeddings", bool(self.lm_kwargs.get("tie_embeddings", True)))
        super().__init__(**kwargs)
