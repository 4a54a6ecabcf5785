"""``quantize.int4_weight``: weight-only 4-bit, asymmetric, in groups along the input dimension.

``method="rtn"`` rounds each weight to the nearest code (the baseline); ``"gptq"`` compensates each
column's rounding error with calibration statistics (see ``gptq``); ``"auto"`` (default) takes
GPTQ when calibration batches were given and round-to-nearest otherwise. ``group_size="auto"``
picks each layer's group size from its weights (see ``group_size``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bevel.passes.base import PassContext, param
from bevel.passes.quantize.calibration import InputStats
from bevel.passes.quantize.group_size import choose_group_size
from bevel.passes.quantize.gptq import gptq_int4
from bevel.passes.quantize.rewrite import BIAS, INPUT, QuantizeParams, QuantizePass, Quantized, Stored
from bevel.passes.quantize.sites import LinearSite
from bevel.passes.registry import register_pass
from bevel.runtime.ops.quant_format import quantize_int4_groups


@register_pass("quantize.int4_weight")
class Int4WeightOnly(QuantizePass):
    """4-bit group-wise weights, two per byte (bevel::int4_weight_linear); activations stay in float."""

    @dataclass
    class Params(QuantizeParams):
        group_size: int | str = param(128, "input columns sharing a scale and zero point, or 'auto' to "
                                           "choose per layer from the weights", choices=(16, 32, 64, 128, 256, "auto"))
        method: str = param("auto", "'rtn' rounds to nearest; 'gptq' compensates rounding errors with "
                                    "calibration data; 'auto' is gptq with calibration, else rtn",
                            choices=("auto", "rtn", "gptq"))

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.params.method == "gptq"

    def prepare(self, ctx: PassContext) -> list[str]:
        self.method = self.params.method
        self.group_sizes: dict[str, int] = {}
        if self.method == "auto":
            self.method = "gptq" if ctx.calibrated else "rtn"
            if not ctx.calibrated:
                return ["method='auto' used round-to-nearest: no calibration batches were given (GPTQ needs them)"]
        return []

    def with_hessian(self) -> bool:
        return self.method == "gptq"

    def sequential(self) -> bool:
        return self.method == "gptq"

    def quantize_linear(self, site: LinearSite, stats: InputStats) -> Quantized | str:
        width = site.weight.shape[1]
        group_size = self.params.group_size
        if group_size == "auto":
            group_size = choose_group_size(site.weight)
            if group_size is None:
                return f"its input width {width} is not a multiple of 32, the smallest automatic group size"
        elif width % group_size:
            return f"group_size={group_size} does not divide its input width {width}"
        self.group_sizes[site.weight_name] = group_size
        if self.method == "gptq":
            qweight, scale, zero = gptq_int4(site.weight, stats.hessian, group_size)
        else:
            qweight, scale, zero = quantize_int4_groups(site.weight, group_size)
        return Quantized(torch.ops.bevel.int4_weight_linear.default,
                         (INPUT, Stored("qweight", qweight), Stored("scale", scale), Stored("zero", zero),
                          group_size, BIAS))

    def extra_stats(self) -> dict[str, Any]:
        figures: dict[str, Any] = {"method": self.method}
        if self.params.group_size == "auto":
            figures["group_size"] = self.group_sizes
        return figures
