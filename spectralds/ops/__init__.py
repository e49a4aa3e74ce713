"""Numerical kernels of the layers: fast custom-autograd ops, each next to its plain reference (`*_ref`).

`ops` imports nothing from the rest of the package; layers import it.
"""

from spectralds.ops.fft_conv import (
    alternating,
    causal_conv_ref,
    fft_size,
    filter_spectra,
    filter_spectra_ref,
    filter_sum,
    filter_sum_ref,
    kernel_mix,
    kernel_mix_ref,
    real_fft,
    real_fft_ref,
)

__all__ = [
    "alternating",
    "causal_conv_ref",
    "fft_size",
    "filter_spectra",
    "filter_spectra_ref",
    "filter_sum",
    "filter_sum_ref",
    "kernel_mix",
    "kernel_mix_ref",
    "real_fft",
    "real_fft_ref",
]
