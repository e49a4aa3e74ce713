"""Sequence layers (mixers) behind one registry: build_layer("stu" | "stu_t" | "lds" | "attn", ...)."""

from spectralds.layers.registry import SequenceLayer, available_layers, build_layer, register_layer

__all__ = ["SequenceLayer", "available_layers", "build_layer", "register_layer"]
