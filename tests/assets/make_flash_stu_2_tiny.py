"""Writes tests/assets/flash_stu_2_tiny/: a tiny model in flash-stu-2's save_pretrained format (config.json,
model.safetensors, spectral_filters.pt), for the README's "Bring your own model" walk-through and its test.

Built with spectralds' own flash-stu-2 export (no code of theirs): a byte-level STU-T / ALiBi-attention
hybrid with the references' GELU-tanh gate and one shared filter projection, random weights (seed 0).
Run from the repository root: python tests/assets/make_flash_stu_2_tiny.py
"""

import shutil
from pathlib import Path

import torch

from spectralds.interop.flash_stu import export_flash_stu2
from spectralds.models import LanguageModel

OUT = Path(__file__).resolve().parent / "flash_stu_2_tiny"


def build() -> LanguageModel:
    torch.manual_seed(0)
    model = LanguageModel(
        vocab_size=256, dim=32, num_layers=2, layer_pattern=["stu_t", "attn"], seq_len=128, num_filters=8,
        mlp_ratio=2, mlp_activation="gelu_tanh", norm_eps=torch.finfo(torch.float32).eps,
        layer_kwargs={"attn": {"num_heads": 2, "window_size": 33, "positions": "alibi",
                               "alibi_slope_scale": 0.25}},
    )
    with torch.no_grad():
        for block in model.blocks:
            if hasattr(block.mixer, "M_filters_minus"):  # flash-stu-2 shares one filter projection
                block.mixer.M_filters_minus.copy_(block.mixer.M_filters_plus)
    return model


if __name__ == "__main__":
    shutil.rmtree(OUT, ignore_errors=True)
    export_flash_stu2(build(), OUT)
    print(f"wrote {OUT}: {', '.join(sorted(p.name for p in OUT.iterdir()))}")
