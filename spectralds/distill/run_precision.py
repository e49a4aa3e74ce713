"""A converted LDS layer measured in the precision and by the path that runs, not only in float64.

A fit can reproduce the filters to 1e-14 in float64 and still decode badly in float32: its terms
B_j C_jk may cancel, so the rounding of the float32 state is amplified in the readout (L=256, K=24,
64 states: 7.7e-14 in float64, 1.4e-4 for float32 decoding). `run_error` measures what a model does
with the layer in its run dtype (the dtype of the LDS state: float32, also under bf16 autocast, or
float64): its `forward` over a probe input, and its `prefill` of the first quarter of the probe followed
by one `step` per remaining position. Both are compared with the layer's own forward computed in float64
(a float64 twin with the same system and projections), by both sequence paths (the scan and the
convolution); the worst relative MSE is the number.
"""

from __future__ import annotations

import torch
from torch import nn

from spectralds.distill.measure import output_rel_mse
from spectralds.layers import build_layer

PROMPT_FRACTION = 4  # the prefill covers the first 1/4 of the probe; decoding steps through the rest
# A forward and a prefill take the scan or a convolution, by shape and device (`layers.lds_paths`): the
# probe is measured by both, since the model's shapes, not the probe's, choose the path that runs.
PATHS = ("scan", "conv")


def rebuilt(layer: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The same LDS layer (system, projections, AR terms) built to run in `dtype`."""
    twin = build_layer(**{**layer.spec(), "dtype": str(dtype).removeprefix("torch.")})
    twin.load_state_dict(layer.state_dict())  # values cast to the twin's parameters
    return twin.to(next(layer.parameters()).device)


def float64_twin(layer: nn.Module) -> nn.Module:
    """The same LDS layer built to run in float64: the reference of `run_error`."""
    return rebuilt(layer, torch.float64)


@torch.no_grad()
def decode_outputs(layer: nn.Module, x: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """(B, T - prompt_len, dim_out): the layer's outputs for x[:, prompt_len:] (B, T, dim), decoded one
    `step` at a time from the state its `prefill` of x[:, :prompt_len] leaves."""
    _, state = layer.prefill(x[:, :prompt_len])
    outputs = []
    for t in range(prompt_len, x.shape[1]):
        y, state = layer.step(x[:, t], state)
        outputs.append(y)
    return torch.stack(outputs, dim=1)


@torch.no_grad()
def run_error(layer: nn.Module, x: torch.Tensor) -> float:
    """Relative MSE, against the layer's forward in float64, of what runs in the layer's own dtype on
    the probe x (1, T, dim): its forward over x and its decoding of the last 3/4 of x from the prefill
    state of the first 1/4 (`decode_outputs`), each by both sequence paths (`PATHS`); the worst."""
    x = x.to(next(layer.parameters()).dtype)  # a float64 layer runs on float64 inputs
    prompt_len = max(1, x.shape[1] // PROMPT_FRACTION)
    reference = float64_twin(layer)(x.double())
    pinned, errors = layer.conv_path, []
    try:
        for path in PATHS:
            layer.conv_path = path
            errors.append(output_rel_mse(layer(x), reference))
            if prompt_len < x.shape[1]:  # a one-step probe has nothing to decode
                errors.append(output_rel_mse(decode_outputs(layer, x, prompt_len), reference[:, prompt_len:]))
    finally:
        layer.conv_path = pinned
    return max(errors)
