"""Choosing a layer's 4-bit group size from its weights alone, in the spirit of FineQuant (Kim et
al., "FineQuant: Unlocking Efficiency with Fine-Grained Weight-Only Quantization for LLMs"):
coarse groups where the weights are even, finer ones only where outliers would otherwise widen a
group's range and cost precision.

Rule: the coarsest of 128, 64, 32 (among those dividing the layer's input width) whose
round-to-nearest weight error is within ``TOLERANCE`` of the finest candidate's. For evenly
spread (Gaussian) weights groups of 128 cost about 30% more error than groups of 32, because the
range of 128 draws is wider, and save a fifth of the stored bytes (scales and zero points of
32-wide groups add 0.14 bytes per weight to the 0.5 of the codes); a few outliers make coarse
groups cost far more than that, and only then do finer groups win.
"""

from __future__ import annotations

import torch

from bevel.passes.quantize.rewrite import relative_error
from bevel.runtime.ops.quant_format import dequantize_int4_groups, quantize_int4_groups

CANDIDATES = (128, 64, 32)
# a coarser grouping is kept while its weight error is at most 50% above the finest one's
TOLERANCE = 0.50


def rtn_weight_error(weight: torch.Tensor, group_size: int) -> float:
    """Relative Frobenius error of round-to-nearest int4 with this group size."""
    qweight, scale, zero = quantize_int4_groups(weight, group_size)
    return relative_error(dequantize_int4_groups(qweight, scale, zero, group_size), weight)


def choose_group_size(weight: torch.Tensor) -> int | None:
    """The group size for a [N, K] weight, or None if no candidate divides K."""
    sizes = [g for g in CANDIDATES if weight.shape[1] % g == 0]
    if not sizes:
        return None
    errors = {g: rtn_weight_error(weight, g) for g in sizes}
    finest = errors[sizes[-1]]
    return next(g for g in sizes if errors[g] <= (1 + TOLERANCE) * finest)
