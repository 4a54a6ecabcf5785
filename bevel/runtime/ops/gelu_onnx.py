"""The ONNX face of ``aten.gelu`` in its exact (erf) form, registered into ``ONNX_TRANSLATIONS`` in
place of the exporter's own: the same standard ops, multiplied in the order onnxruntime recognizes.

Both compute 0.5 x (1 + erf(x / sqrt 2)). The exporter writes ``x * (0.5 * (1 + erf))``, which
onnxruntime runs as five elementwise passes over the FFN's activations (Div, Erf, Add, Mul, Mul);
its Gelu fusion matches ``(x * 0.5) * (1 + erf)`` only, and then also takes the Linear's bias Add
before it into one BiasGelu kernel. The tanh approximation goes to the exporter's translation.
"""

from __future__ import annotations

import math

import torch
from onnxscript import opset18 as op
from onnxscript.function_libs.torch_lib.ops.nn import aten_gelu
from onnxscript.onnx_types import TensorType

from bevel.runtime.ops import ONNX_TRANSLATIONS

Tensor = TensorType  # the translation's annotations: any tensor type; at export it receives ir.Values


def gelu_onnx(x: Tensor, approximate: str = "none") -> Tensor:
    """``gelu`` as ``(x * 0.5) * (1 + erf(x / sqrt 2))`` (see the module docstring)."""
    if approximate != "none":
        return aten_gelu(x, approximate)

    def constant(value: float):
        return op.CastLike(op.Constant(value_float=value), x)

    return op.Mul(op.Mul(x, constant(0.5)), op.Add(op.Erf(op.Div(x, constant(math.sqrt(2.0)))), constant(1.0)))


ONNX_TRANSLATIONS[torch.ops.aten.gelu.default] = gelu_onnx
