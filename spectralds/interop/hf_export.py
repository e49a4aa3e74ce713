"""`export_hf`: a LanguageModel as a transformers directory that `AutoModelForCausalLM` loads.

The directory holds config.json (the LanguageModel's arguments and layer specs), model.safetensors,
the tokenizer files and two one-line code files that import the classes from the installed spectralds
package (`trust_remote_code=True` loads them; importing `spectralds.interop.hf_model` registers them with
the Auto classes instead), so the directory's code stays tiny and versioned with spectralds.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from spectralds import __version__
from spectralds.data.tokenizers import Tokenizer
from spectralds.errors import FileWriteError, UserError, first_line
from spectralds.interop.hf_require import require_transformers
from spectralds.io import _umask

# LanguageModel arguments that describe training, not the network.
_TRAINING_ARGS = ("optimizer", "lr_scheduler", "nonfinite_loss", "compile")
_CODE = {
    "configuration_spectralds.py": ("SpectralDSConfig", "spectralds.interop.hf_config"),
    "modeling_spectralds.py": ("SpectralDSForCausalLM", "spectralds.interop.hf_model"),
}
AUTO_MAP = {
    "AutoConfig": "configuration_spectralds.SpectralDSConfig",
    "AutoModelForCausalLM": "modeling_spectralds.SpectralDSForCausalLM",
}


def lm_arguments(model: torch.nn.Module) -> dict[str, Any]:
    """The LanguageModel's constructor arguments, checked to be JSON (config.json holds them)."""
    from spectralds.models.lm import LanguageModel

    if not isinstance(model, LanguageModel):
        raise UserError(f"only a spectralds LanguageModel can be exported, got a {type(model).__name__}")
    hparams = dict(model.hparams)
    kwargs = {k: v for k, v in hparams.items() if not k.startswith("_") and k not in _TRAINING_ARGS}
    for key, value in kwargs.items():
        try:
            json.dumps(value)
        except TypeError as err:
            raise UserError(f"model argument {key}={value!r} cannot be written to config.json") from err
    return kwargs


def build_hf_model(model: torch.nn.Module):
    """A `SpectralDSForCausalLM` holding `model`'s architecture and a copy of its weights."""
    require_transformers()
    from spectralds.interop.hf_config import SpectralDSConfig
    from spectralds.interop.hf_model import SpectralDSForCausalLM
    from spectralds.layers import layer_specs

    dtype = next(model.parameters()).dtype
    config = SpectralDSConfig(
        lm_kwargs=lm_arguments(model), layer_specs=layer_specs(model), auto_map=AUTO_MAP,
        architectures=["SpectralDSForCausalLM"], spectralds_version=__version__,
    )
    config.dtype = dtype
    hf = SpectralDSForCausalLM(config).to(dtype)
    try:
        hf.lm.load_state_dict(model.state_dict(), strict=True)
    except RuntimeError as err:
        raise UserError(f"the model's weights do not fit its own layer specs: {first_line(err)}") from err
    return hf.eval()


def export_hf(model: torch.nn.Module, out_dir: str | os.PathLike, tokenizer: Tokenizer) -> Path:
    """Write the transformers directory `out_dir` (which must not exist, or be empty), all or nothing."""
    require_transformers()
    from spectralds.interop.hf_tokenizer import save_hf_tokenizer, write_code_file

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"refusing to write {out}: it exists and is not an empty directory")
    if not out.parent.is_dir():
        raise UserError(f"cannot write {out}: directory {out.parent} does not exist")
    if tokenizer.vocab_size > model.hparams.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{model.hparams.vocab_size}")
    hf = build_hf_model(model)
    # Everything goes to a hidden sibling first, renamed into place at the end.
    staging = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        hf.save_pretrained(str(staging))
        save_hf_tokenizer(tokenizer, staging, max_length=model.seq_len)
        for name, (cls, module) in _CODE.items():
            write_code_file(staging, name, cls, module)
        for path in staging.iterdir():  # save_pretrained writes some files 0600: permissions from the umask
            path.chmod(0o666 & ~_umask())
        os.replace(staging, out)
    except OSError as err:
        raise FileWriteError(f"could not write {out}: {err.strerror or first_line(err)}") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
