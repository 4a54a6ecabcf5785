"""The ONNX face of ``bevel::semi_structured_linear``, registered into ``ONNX_TRANSLATIONS``."""

from __future__ import annotations

import torch
from onnxscript import opset18 as op
from onnxscript.onnx_types import TensorType

from bevel.runtime.ops import ONNX_TRANSLATIONS


def semi_structured_linear_onnx(x: TensorType, weight: TensorType, bias: TensorType | None) -> TensorType:
    """``MatMul(x, Transpose(weight)) + bias``: ONNX has no sparse GEMM, the weight stays dense."""
    out = op.MatMul(x, op.Transpose(weight, perm=[1, 0]))
    return out if bias is None else op.Add(out, bias)


ONNX_TRANSLATIONS[torch.ops.bevel.semi_structured_linear.default] = semi_structured_linear_onnx
