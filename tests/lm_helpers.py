"""Tiny float64 language models of any layer pattern, shared by the decoding tests."""

import torch

from spectralds.generate import set_decode_method
from spectralds.models import LanguageModel


def float64_lm(pattern, decode: str = "futurefill", seq_len: int = 64, window: int = 5) -> LanguageModel:
    """A seeded float64 LanguageModel with the layers of `pattern` (dim 16, 4 filters, vocab 32), its AR
    weights made nonzero (they start at zero) and its STU layers decoding by `decode`."""
    torch.manual_seed(0)
    model = LanguageModel(
        vocab_size=32, dim=16, num_layers=len(pattern), layer_pattern=list(pattern), seq_len=seq_len,
        num_filters=4,
        layer_kwargs={"attn": {"num_heads": 2, "window_size": window},
                      "lds": {"state_dim": 8, "dtype": "float64"},
                      "lds_ar": {"state_dim": 8, "ar_order": 2, "dtype": "float64"}},
    ).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ar." in name:
                p.copy_(torch.randn_like(p) * 0.1)
    set_decode_method(model, decode)
    return model
