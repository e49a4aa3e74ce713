"""Sequence layers (mixers) behind one registry: build_layer("stu" | "stu_t" | "lds" | "attn", ...)."""

# Importing the layer modules registers them.
from spectralds.layers import ar, attention, lds, stu  # noqa: E402, F401
from spectralds.layers.registry import (
    DECODE_METHODS,
    SequenceLayer,
    available_layers,
    build_layer,
    layer_spec,
    layer_specs,
    register_layer,
    restore_layers,
)

__all__ = [
    "DECODE_METHODS",
    "SequenceLayer",
    "available_layers",
    "build_layer",
    "layer_spec",
    "layer_specs",
    "register_layer",
    "restore_layers",
]
