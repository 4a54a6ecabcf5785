"""``quantize.int8_weight``: weight-only int8, symmetric, one scale per output channel."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bevel.passes.quantize.calibration import InputStats
from bevel.passes.quantize.rewrite import BIAS, INPUT, QuantizeParams, QuantizePass, Quantized, Stored
from bevel.passes.quantize.sites import LinearSite
from bevel.passes.registry import register_pass
from bevel.runtime.ops.quant_format import quantize_int8_per_channel


@register_pass("quantize.int8_weight")
class Int8WeightOnly(QuantizePass):
    """Per-channel symmetric int8 weights; activations stay in float (bevel::int8_weight_linear)."""

    @dataclass
    class Params(QuantizeParams):
        pass

    def quantize_linear(self, site: LinearSite, stats: InputStats) -> Quantized | str:
        qweight, scale = quantize_int8_per_channel(site.weight)
        return Quantized(torch.ops.bevel.int8_weight_linear.default,
                         (INPUT, Stored("qweight", qweight), Stored("scale", scale), BIAS))
