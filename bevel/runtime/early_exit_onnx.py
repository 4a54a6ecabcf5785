"""The ONNX faces of the early-exit ops (``early_exit_ops``), registered into ``ONNX_TRANSLATIONS``,
in standard opset-18 ops (``Softmax``, ``ReduceMax``, ``TopK``, ``Where``, ``CumSum``)."""

from __future__ import annotations

import onnx_ir as ir
import torch
from onnxscript import opset18 as op
from onnxscript.onnx_types import TensorType

import bevel.runtime.early_exit_ops  # noqa: F401  (registers torch.ops.bevel.early_exit_*)
from bevel.runtime.ops import ONNX_TRANSLATIONS

Tensor = TensorType  # the translations' annotations: any tensor type; at export they receive ir.Values


def _ints(*values: int) -> ir.Value:
    return op.Constant(value_ints=list(values))


def early_exit_decide_onnx(logits: Tensor, depth: Tensor, threshold: float, exit_depth: int, criterion: str,
                           shared: bool) -> Tensor:
    """``early_exit_decide`` step by step as its reference."""
    probabilities = op.Softmax(op.Cast(logits, to=ir.DataType.FLOAT), axis=-1)
    if criterion == "max_prob":
        confidence = op.ReduceMax(probabilities, _ints(-1), keepdims=0)
    else:
        top, _ = op.TopK(probabilities, _ints(2), axis=-1)
        first = op.Squeeze(op.Slice(top, _ints(0), _ints(1), _ints(-1)), _ints(-1))
        second = op.Squeeze(op.Slice(top, _ints(1), _ints(2), _ints(-1)), _ints(-1))
        confidence = op.Sub(first, second)
    exit_value = op.CastLike(op.Constant(value_int=exit_depth), depth)
    exited_before = op.Less(depth, exit_value)
    exits = op.Or(op.Greater(confidence, op.Constant(value_float=threshold)), exited_before)
    if shared:
        # all over the batch: the minimum of 0/1 flags; then a running maximum along the sequence,
        # as "the running count of exits is above zero"
        flags = op.Cast(exits, to=ir.DataType.INT64)
        flags = op.Expand(op.ReduceMin(flags, _ints(0), keepdims=1), op.Shape(flags))
        if len(logits.shape) >= 3:
            flags = op.CumSum(flags, op.Constant(value_int=1))
        exits = op.Greater(flags, op.Constant(value_int=0))
    return op.Where(op.And(exits, op.Not(exited_before)), op.Expand(exit_value, op.Shape(depth)), depth)


def early_exit_freeze_onnx(hidden_in: Tensor, hidden_out: Tensor, depth: Tensor, block: int) -> Tensor:
    """``early_exit_freeze`` as ``Where`` over the depths broadcast to the hidden state."""
    frozen = op.LessOrEqual(depth, op.CastLike(op.Constant(value_int=block), depth))
    extra = len(hidden_out.shape) - len(depth.shape)
    if extra:
        frozen = op.Unsqueeze(frozen, _ints(*range(-extra, 0)))
    return op.Where(frozen, hidden_in, hidden_out)


ONNX_TRANSLATIONS[torch.ops.bevel.early_exit_decide.default] = early_exit_decide_onnx
ONNX_TRANSLATIONS[torch.ops.bevel.early_exit_freeze.default] = early_exit_freeze_onnx
