"""``quantize.int8_dynamic``: W8A8, weights int8 per channel, activations quantized per token at run
time; ``smooth`` (SmoothQuant's alpha) first moves activation outliers into the weights;
``activation_bits`` 7 narrows the activation codes so that CPUs without VNNI multiply them in one
pass (see ``cpu_integer_linear``), at about twice the activation error; by default the pass takes 7
where the CPU compiled for would saturate 8-bit codes in its integer GEMMs (they then run split: on
an AVX2 CPU MiniLM's W8A8 forward took 2.3 times as long with 8-bit codes as torch.ao's, see
benchmarks/RESULTS.md) and 8 elsewhere.

Smoothing is kept for a layer only where it lowers the layer's measured error on the calibration
batches by at least ``SMOOTHING_GAIN``: it costs a multiply over the input on every call, and on
some layers it does harm (on MiniLM, with symmetric activation codes, it cut the error of
query/key/value and the first FFN layer by 35-65% but raised the second FFN layer's by up to 77%,
where the GELU output has no outlier channels to move). Layers that read the same input (query,
key and value) share one factor, computed from their weights together, and one decision, taken on
their summed errors, as SmoothQuant does for them: their input is then quantized once, in one fused
op (see ``siblings``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bevel.passes.base import PassContext, param
from bevel.passes.quantize.calibration import InputStats
from bevel.passes.quantize.rewrite import BIAS, INPUT, QuantizeParams, QuantizePass, Quantized, Stored
from bevel.passes.quantize.sites import LinearSite
from bevel.passes.quantize.smoothquant import smoothing_factors
from bevel.passes.registry import register_pass
from bevel.runtime.ops import cpu_integer_linear
from bevel.runtime.ops.quant_format import TOKEN_BITS, quantize_int8_per_channel


# smoothing must cut a layer's error by this fraction to be kept
SMOOTHING_GAIN = 0.10


@register_pass("quantize.int8_dynamic")
class Int8Dynamic(QuantizePass):
    """int8 weights per channel and int8 activations per token (bevel::int8_dynamic_linear)."""

    @dataclass
    class Params(QuantizeParams):
        smooth: float = param(0.5, "SmoothQuant migration strength alpha, from calibration statistics "
                                   "(0 disables smoothing)", ge=0.0, le=1.0)
        activation_bits: int | None = param(None, "bits of the per-token activation codes: 8, or 7, which CPUs "
                                               "without VNNI multiply in one pass instead of two, at about twice "
                                               "the activation error; none: 7 where the CPU compiled for has no "
                                               "VNNI (its integer GEMMs would saturate), else 8",
                                            choices=(None, *TOKEN_BITS))

    def prepare(self, ctx: PassContext) -> list[str]:
        self.smoothed: list[str] = []
        self.smoothing: dict[str, torch.Tensor | None] = {}  # weight name -> the factors its group chose
        notes = []
        if self.params.smooth > 0 and not ctx.calibrated:
            notes.append("smoothing statistics come from the example inputs: no calibration batches were given")
        saturates = ctx.device == "cpu" and cpu_integer_linear.available() and cpu_integer_linear.fbgemm_saturates()
        self.bits = self.params.activation_bits or (7 if saturates else 8)
        if saturates and self.params.activation_bits is None:
            notes.append("activation codes of 7 bits: this CPU sums int8 products in int16 pairs (no VNNI), which "
                         "8-bit codes can saturate; quantize.int8_dynamic(activation_bits=8) keeps 8 bits, exact "
                         "on weights split in two halves, at about twice the GEMM time")
        elif saturates and self.bits == 8:  # 7-bit codes never saturate
            notes.append("this CPU sums int8 products in int16 pairs (no VNNI), which can saturate: its integer "
                         "GEMMs run exactly on weights split in two halves, at about twice their time; "
                         "quantize.int8_dynamic(activation_bits=7) runs in one pass there")
        return notes

    def quantize_linear(self, site: LinearSite, stats: InputStats) -> Quantized | str:
        if self.params.smooth == 0:
            return self._plan(site.weight, None)
        if site.weight_name not in self.smoothing:
            self._choose_smoothing(self.siblings_of(site), stats)
        factors = self.smoothing[site.weight_name]
        if factors is None:
            return self._plan(site.weight, None)
        self.smoothed.append(site.weight_name)
        return self._plan(site.weight.float() * factors, Stored("input_scale", 1.0 / factors))

    def _choose_smoothing(self, group: list[LinearSite], stats: InputStats) -> None:
        """One set of factors for layers reading the same input (their weights stacked), kept if it
        cuts their summed error by SMOOTHING_GAIN; ``stats`` are those of the input they share."""
        factors = smoothing_factors(stats.absmax, torch.cat([s.weight for s in group]), self.params.smooth)
        plain = smoothed = 0.0
        for site in group:
            plain += self.layer_error(site, self._plan(site.weight, None), stats)
            smoothed += self.layer_error(site, self._plan(site.weight.float() * factors,
                                                          Stored("input_scale", 1.0 / factors)), stats)
        chosen = factors if smoothed <= (1 - SMOOTHING_GAIN) * plain else None
        self.smoothing.update({s.weight_name: chosen for s in group})

    def _plan(self, weight: torch.Tensor, input_scale: Stored | None) -> Quantized:
        qweight, scale = quantize_int8_per_channel(weight)
        return Quantized(torch.ops.bevel.int8_dynamic_linear.default,
                         (INPUT, Stored("qweight", qweight), Stored("scale", scale), BIAS, input_scale,
                          self.bits))

    def extra_stats(self) -> dict[str, Any]:
        return {"smoothed": self.smoothed, "activation_bits": self.bits}
