"""Quantization passes: int8 and int4 weight-only, and W8A8 with per-token activations."""

from bevel.passes.quantize import int4_weight, int8_dynamic, int8_weight  # noqa: F401
