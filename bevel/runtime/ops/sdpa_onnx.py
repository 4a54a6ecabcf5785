"""The ONNX face of ``aten.scaled_dot_product_attention``, registered into ``ONNX_TRANSLATIONS`` in
place of the exporter's own for the common case: 4-D query, key and value with as many key as query
heads, no causal flag, no dropout.

The exporter's translation makes a boolean mask into a bias of the dtype's lowest value and then
looks for NaN in the softmax weights, two more passes over the [B, H, T, L] weights (IsNaN and
Where took 110 of 690 ms of a padded MiniLM batch in onnxruntime); and a query that sees no key
then gets the mean of all values, where PyTorch gives zeros. Here a boolean mask becomes the same
finite bias, and the output is multiplied by whether each query sees any key (a [.., T, 1] factor
computed from the mask alone, so onnxruntime computes it once for all layers sharing the mask):
PyTorch's zeros without a pass over the weights or a NaN test of the output. An additive float
mask is added as it is; a query whose biases are all -inf then gets NaN from the softmax, and those
are zeroed in the [B, H, T, D] output. Anything else goes to the exporter's translation.
"""

from __future__ import annotations

import math

import onnx_ir as ir
import torch
from onnxscript import opset18 as op
from onnxscript.function_libs.torch_lib.ops.nn import aten_scaled_dot_product_attention
from onnxscript.onnx_types import TensorType

from bevel.runtime.ops import ONNX_TRANSLATIONS
from bevel.runtime.ops.attention_onnx import EXP_FLOOR

Tensor = TensorType  # the translation's annotations: any tensor type; at export it receives ir.Values


def _rank(x) -> int | None:
    return None if x.shape is None else len(x.shape)


def _scale(query, scale: float | None):
    """The scores' factor in the query's dtype: ``scale``, else 1 / sqrt(head dim), computed at run
    time where the head dim is not fixed."""
    dim = query.shape[-1]
    if scale is not None or isinstance(dim, int):
        return op.CastLike(op.Constant(value_float=scale if scale is not None else 1 / math.sqrt(dim)), query)
    size = op.Cast(op.Shape(query, start=-1), to=ir.DataType.FLOAT)
    return op.CastLike(op.Reciprocal(op.Sqrt(size)), query)


def _lowest(query) -> float:
    """The most negative finite value of the query's dtype that a float32 constant holds."""
    dtype = {ir.DataType.FLOAT16: torch.float16, ir.DataType.BFLOAT16: torch.bfloat16}.get(query.dtype, torch.float32)
    return float(torch.finfo(dtype).min)


def _masked_softmax(logits):
    """Softmax over the last axis with every logit raised to at least the row's maximum minus
    ``EXP_FLOOR`` (see there; for [32, 12, 128, 128] with most keys masked onnxruntime's softmax took
    12 ms instead of 1)."""
    floor = op.Sub(op.ReduceMax(logits, op.Constant(value_ints=[-1]), keepdims=1),
                   op.CastLike(op.Constant(value_float=EXP_FLOOR), logits))
    return op.Softmax(op.Max(logits, floor), axis=-1)


def scaled_dot_product_attention_onnx(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                                      dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                                      enable_gqa: bool = False) -> Tensor:
    """``scaled_dot_product_attention`` as MatMul, Softmax, MatMul (see the module docstring)."""
    plain = (not is_causal and not dropout_p and not enable_gqa and _rank(query) == _rank(key) == _rank(value) == 4
             and key.shape[1] == query.shape[1])
    if not plain:
        return aten_scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                 enable_gqa)
    scores = op.MatMul(op.Mul(query, _scale(query, scale)), op.Transpose(key, perm=[0, 1, 3, 2]))
    if attn_mask is None:
        return op.MatMul(op.Softmax(scores, axis=-1), value)
    if attn_mask.dtype == ir.DataType.BOOL:
        # finite, so a query that sees no key gets finite weights (zeroed below), never NaN
        lowest = op.CastLike(op.Constant(value_float=_lowest(query)), query)
        bias = op.Where(attn_mask, op.CastLike(op.Constant(value_float=0.0), query), lowest)
        sees_any = op.CastLike(op.ReduceMax(op.Cast(attn_mask, to=ir.DataType.FLOAT), op.Constant(value_ints=[-1]),
                                            keepdims=1), query)
        return op.Mul(op.MatMul(_masked_softmax(op.Add(scores, bias)), value), sees_any)
    out = op.MatMul(_masked_softmax(op.Add(scores, op.CastLike(attn_mask, query))), value)
    return op.Where(op.IsNaN(out), op.CastLike(op.Constant(value_float=0.0), query), out)  # all -inf: zeros


ONNX_TRANSLATIONS[torch.ops.aten.scaled_dot_product_attention.default] = scaled_dot_product_attention_onnx
