"""``quantize.int4_weight``: weight-only 4-bit, asymmetric, in groups along the input dimension.

``method="rtn"`` rounds each weight to the nearest code (the baseline); ``"gptq"`` compensates each
column's rounding error with calibration statistics, layer after layer on the partly quantized
model's activations, each layer aimed at the float model's outputs (``asymmetric``, see ``gptq``);
``"awq"`` scales input channels by their activations before rounding, the inverse scale becoming
a multiply on the layer's input (see ``awq``); ``"auto"`` (default) takes GPTQ when calibration
batches were given and round-to-nearest otherwise. ``group_size="auto"`` picks each layer's group
size from its weights (see ``group_size``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bevel.passes.base import PassContext, param
from bevel.passes.quantize.calibration import InputStats
from bevel.passes.quantize.group_size import choose_group_size
from bevel.passes.quantize.gptq import fit_to_float_outputs, gptq_int4
from bevel.passes.quantize.rewrite import (BIAS, INPUT, QuantizeParams, QuantizePass, Quantized, Stored,
                                           int8_embedding_table, relative_error)
from bevel.passes.quantize.sites import EmbeddingSite, LinearSite
from bevel.passes.registry import register_pass
from bevel.passes.quantize.awq import awq_scales
from bevel.runtime.ops.quant_format import (dequantize_int4_groups, quantize_int4_groups,
                                            searched_int4_group_params)


# 4-bit embedding tables get groups of 32: a looked-up row is used as it is, no later layer can
# compensate its rounding (on MiniLM's token table alone the sentence embeddings kept a min cosine of
# 0.998 with groups of 32 and 0.997 with groups of 64)
EMBEDDING_GROUP_SIZE = 32


@register_pass("quantize.int4_weight")
class Int4WeightOnly(QuantizePass):
    """4-bit group-wise weights, two per byte (bevel::int4_weight_linear); activations stay in float."""

    @dataclass
    class Params(QuantizeParams):
        group_size: int | str = param(128, "input columns sharing a scale and zero point, or 'auto' to "
                                           "choose per layer from the weights", choices=(16, 32, 64, 128, 256, "auto"))
        method: str = param("auto", "'rtn' rounds to nearest; 'gptq' compensates rounding errors with "
                                    "calibration data; 'awq' scales input channels by their activations "
                                    "before rounding; 'auto' is gptq with calibration, else rtn",
                            choices=("auto", "rtn", "gptq", "awq"))
        asymmetric: bool = param(True, "with gptq: fit each layer to the float model's outputs, so that it also "
                                       "corrects the error the layers before it left (GPTAQ); False fits it to "
                                       "its own float output on the same inputs (plain GPTQ, one calibration "
                                       "run per stage instead of two)")
        embedding_bits: int = param(8, "bits of quantized embedding tables: 8 (int8 rows) or 4 (groups of 32, "
                                       "smaller and less faithful)", choices=(4, 8))

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.params.method in ("gptq", "awq")

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

    def fits_float_outputs(self) -> bool:
        return self.method == "gptq" and self.params.asymmetric

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
        weight, input_scale = site.weight.float(), None
        if self.method == "awq":
            def round_trip(w: torch.Tensor) -> torch.Tensor:
                return dequantize_int4_groups(*quantize_int4_groups(w, group_size), group_size)

            factors, _ = awq_scales(weight, stats.sample(), round_trip)
            weight, input_scale = weight * factors, Stored("awq_scale", 1.0 / factors)
        if self.method == "gptq":
            if stats.cross is not None:
                weight = fit_to_float_outputs(weight, stats.hessian, stats.cross)
            qweight, scale, zero = gptq_int4(weight, stats.hessian, group_size)
        else:
            qweight, scale, zero = quantize_int4_groups(weight, group_size)
        return Quantized(torch.ops.bevel.int4_weight_linear.default,
                         (INPUT, Stored("qweight", qweight), Stored("scale", scale), Stored("zero", zero),
                          group_size, BIAS), input_scale)

    def quantize_embedding(self, site: EmbeddingSite) -> tuple[Quantized, float]:
        """With ``embedding_bits=4``, 4-bit rows in groups of EMBEDDING_GROUP_SIZE with the clipping
        search of each group's range (rows cannot be error-compensated); else, or when the group does
        not divide the width, int8 rows."""
        if self.params.embedding_bits == 8 or site.weight.shape[1] % EMBEDDING_GROUP_SIZE:
            return int8_embedding_table(site)
        scale, zero = searched_int4_group_params(site.weight, EMBEDDING_GROUP_SIZE)
        qweight, scale, zero = quantize_int4_groups(site.weight, EMBEDDING_GROUP_SIZE, scale, zero)
        error = relative_error(dequantize_int4_groups(qweight, scale, zero, EMBEDDING_GROUP_SIZE), site.weight)
        return Quantized(torch.ops.bevel.int4_embedding.default,
                         (Stored("qweight", qweight), Stored("scale", scale), Stored("zero", zero),
                          EMBEDDING_GROUP_SIZE, INPUT)), error

    def extra_stats(self) -> dict[str, Any]:
        figures: dict[str, Any] = {"method": self.method}
        if self.params.group_size == "auto":
            figures["group_size"] = self.group_sizes
        return figures
