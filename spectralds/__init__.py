"""spectralds: train spectral state-space models and distill them into fast LDS layers."""

__version__ = "0.1.0"

from spectralds.interop.hf_auto import install as _install_hf_auto  # noqa: E402

_install_hf_auto()  # AutoConfig / AutoModelForCausalLM know "spectralds" directories (no import here)
