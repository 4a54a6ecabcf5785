"""The ONNX face of bevel's attention and KV-cache ops: onnxscript translations registered into
``ONNX_TRANSLATIONS``, in standard opset-18 ops.

- ``sparse_attention``: dense attention under the op's boolean mask: the position rule (causality,
  per-head windows and sinks) from the position inputs, and, with a block index table, the listed
  blocks scattered into a block mask (``ScatterElements``) and spread over the elements by two
  ``Gather``s. ONNX has no block-sparse kernel: the file computes every score and masks, so it
  gives the op's outputs, not its speed.
- ``estimate_attention_blocks``: pooled queries and keys (``Pad``, ``ReduceSum``), the block
  softmax and the ranking (``TopK`` over every block, ``CumSum`` for the threshold), step by step
  as the reference.
- ``cache_attention``: the cache dequantized (int8 codes times their scale; 4-bit codes unpacked
  with ``BitwiseAnd``/``BitShift``), then the same masked attention; the mass per slot by
  ``ReduceSum`` of the weights. Slot positions must be [B, L] (one set of slots for all heads, as
  in an exported step graph).
- ``quantize_kv`` / ``dequantize_kv``: the group arithmetic of ``kv_quant`` (``Round`` rounds half to
  even like torch), 4-bit codes packed with ``BitShift``/``BitwiseOr``.

Every computation is in float32 and cast back to the input's dtype, as the references do.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch
from onnxscript import opset18 as op
from onnxscript.onnx_types import TensorType

from bevel.runtime.ops import ONNX_TRANSLATIONS

FLOAT, INT64, BOOL, UINT8, INT8 = (ir.DataType.FLOAT, ir.DataType.INT64, ir.DataType.BOOL, ir.DataType.UINT8,
                                   ir.DataType.INT8)
Tensor = TensorType  # the translations' annotations: any tensor type; at export they receive ir.Values


def _ints(*values: int) -> ir.Value:
    return op.Constant(value_ints=list(values))


def _float(value: float) -> ir.Value:
    return op.Constant(value_float=value)


def _dim(value: ir.Value, axis: int) -> ir.Value:
    """One dimension of ``value`` at run time, as a 1-D int64 tensor of one element."""
    return op.Shape(value, start=axis, end=axis + 1)


def _arange(count: ir.Value) -> ir.Value:
    """``arange(count)`` for a 1-D count of one element."""
    return op.Range(op.Constant(value_int=0), op.Squeeze(count, _ints(0)), op.Constant(value_int=1))


def _heads(values: list[int]) -> ir.Value:
    """Per-head values as an int64 [1, heads, 1, 1] constant ([1, 1, 1, 1] for one value for all)."""
    return op.Constant(value=ir.tensor(np.array(values, dtype=np.int64).reshape(1, -1, 1, 1)))


def _group(q: ir.Value, k: ir.Value) -> ir.Value:
    """Query heads per KV head, at run time (1-D int64)."""
    return op.Div(_dim(q, 1), _dim(k, 1))


def _per_query_head(x: ir.Value, group: ir.Value) -> ir.Value:
    """[B, Hkv, L, D] -> [B, Hkv * group, L, D]: each KV head repeated for its query heads (repeat_kv)."""
    expanded = op.Expand(op.Unsqueeze(x, _ints(2)),
                         op.Concat(_dim(x, 0), _dim(x, 1), group, op.Shape(x, start=2), axis=0))
    return op.Reshape(expanded, op.Concat(_dim(x, 0), _ints(-1), op.Shape(x, start=2), axis=0))


def _position_rule(q_positions: ir.Value, kv_positions: ir.Value, window: list[int], sinks: list[int]) -> ir.Value:
    """The position rule as a boolean [B, heads or 1, T, L]."""
    if kv_positions.shape is not None and len(kv_positions.shape) != 2:
        raise ValueError("the ONNX attention translation takes slot positions [B, L] shared by the heads")
    q = op.Unsqueeze(op.Unsqueeze(q_positions, _ints(1)), _ints(3))  # [B, 1, T, 1]
    kv = op.Unsqueeze(kv_positions, _ints(1, 2))  # [B, 1, 1, L]
    w, s = _heads(window), _heads(sinks)
    zero = op.Constant(value_int=0)
    distance = op.Sub(q, kv)
    seen = op.And(op.GreaterOrEqual(kv, zero), op.GreaterOrEqual(distance, zero))
    near = op.Or(op.Or(op.LessOrEqual(w, zero), op.Less(distance, w)), op.Less(kv, s))
    return op.And(seen, near)


def _block_mask(block_index: ir.Value, q: ir.Value, k: ir.Value, block: int) -> ir.Value:
    """The table as an element mask [B, H, T, L] (``block_table_mask``): listed blocks scattered into
    a [B, H, query blocks, key blocks + 1] mask (-1 entries into the extra column), then gathered
    per query and per key."""
    keys = _dim(k, 2)
    key_blocks = op.Div(op.Add(keys, _ints(block - 1)), _ints(block))
    shape = op.Concat(op.Shape(block_index, start=0, end=3), op.Add(key_blocks, _ints(1)), axis=0)
    listed = op.Expand(op.Constant(value=ir.tensor(np.array(False))), shape)
    where = op.Where(op.Less(block_index, _ints(0)), key_blocks, block_index)
    listed = op.ScatterElements(listed, where, op.Expand(op.Constant(value=ir.tensor(np.array(True))),
                                                         op.Shape(where)), axis=3)
    rows = op.Div(_arange(_dim(q, 2)), _ints(block))
    cols = op.Div(_arange(keys), _ints(block))
    return op.Gather(op.Gather(listed, rows, axis=2), cols, axis=3)


# How far below its row's maximum a logit is raised before exp: onnxruntime's Exp and Softmax run
# about 12x slower where results are denormal or zero (below ~-87: every masked key, at -inf), and
# e^-80 = 1.8e-35 of the row's largest weight stays far below float32's resolution of it
EXP_FLOOR = 80.0


def _exp_above_floor(x: ir.Value) -> ir.Value:
    """exp(x) for x <= 0, with x raised to at least -EXP_FLOOR first; the callers zero masked entries
    themselves."""
    return op.Exp(op.Max(x, _float(-EXP_FLOOR)))


def _masked_attention(q: ir.Value, k: ir.Value, v: ir.Value, mask: ir.Value, scale: float) -> ir.Value:
    """softmax(q k^T * scale over the mask) v in float32, [B, H, T, D]; weights [B, H, T, L] too."""
    scores = op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])), _float(scale))
    scores = op.Where(mask, scores, _float(float("-inf")))
    top = op.ReduceMax(scores, _ints(-1), keepdims=1)
    top = op.Where(op.IsInf(top), _float(0.0), top)
    weights = op.Where(mask, _exp_above_floor(op.Sub(scores, top)), _float(0.0))
    total = op.ReduceSum(weights, _ints(-1), keepdims=1)
    weights = op.Div(weights, op.Where(op.Greater(total, _float(0.0)), total, _float(1.0)))
    return op.MatMul(weights, v), weights


def _as_float(x: ir.Value) -> ir.Value:
    return x if x.dtype == FLOAT else op.Cast(x, to=FLOAT)


def _like(out: ir.Value, x: ir.Value) -> ir.Value:
    return out if x.dtype in (FLOAT, None) else op.Cast(out, to=x.dtype)


def sparse_attention_onnx(q: Tensor, k: Tensor, v: Tensor, q_positions: Tensor, kv_positions: Tensor,
                          window: list[int], sinks: list[int], block_index: Tensor | None, block: int,
                          scale: float) -> Tensor:
    """``sparse_attention`` as masked dense attention (see the module docstring)."""
    group = _group(q, k)
    mask = _position_rule(q_positions, kv_positions, window, sinks)
    if block_index is not None:
        mask = op.And(mask, _block_mask(block_index, q, k, block))
    out, _ = _masked_attention(_as_float(q), _per_query_head(_as_float(k), group),
                               _per_query_head(_as_float(v), group), mask, scale)
    return _like(out, q)


def _pooled(x: ir.Value, block: int, weight: ir.Value) -> ir.Value:
    """Mean of each block of rows of ``x`` [B, H, N, D] weighted by ``weight`` [B, 1|H, N] (0/1)."""
    count = _dim(x, 2)
    pad = op.Mod(op.Sub(_ints(block), op.Mod(count, _ints(block))), _ints(block))
    rows = op.Pad(x, op.Concat(_ints(0, 0, 0, 0, 0, 0), pad, _ints(0), axis=0))  # [begins..., ends...]
    weight = op.Pad(weight, op.Concat(_ints(0, 0, 0, 0, 0), pad, axis=0))
    rows = op.Reshape(rows, op.Concat(op.Shape(x, start=0, end=2), _ints(-1, block), _dim(x, 3), axis=0))
    weight = op.Unsqueeze(op.Reshape(weight, op.Concat(op.Shape(weight, start=0, end=2), _ints(-1, block),
                                                       axis=0)), _ints(-1))
    summed = op.ReduceSum(op.Mul(rows, weight), _ints(3), keepdims=0)
    return op.Div(summed, op.Max(op.ReduceSum(weight, _ints(3), keepdims=0), _float(1.0)))


def _ranges(positions: ir.Value, block: int, pad_value: int, reduce) -> ir.Value:
    """``reduce`` (ReduceMin or ReduceMax) over each block of ``positions`` [B, N] padded with ``pad_value``."""
    count = _dim(positions, 1)
    pad = op.Mod(op.Sub(_ints(block), op.Mod(count, _ints(block))), _ints(block))
    padded = op.Pad(positions, op.Concat(_ints(0, 0, 0), pad, axis=0), op.Constant(value_int=pad_value))
    blocks = op.Reshape(padded, op.Concat(_dim(positions, 0), _ints(-1, block), axis=0))
    return reduce(blocks, _ints(-1), keepdims=0)


def estimate_attention_blocks_onnx(q: Tensor, k: Tensor, q_positions: Tensor, kv_positions: Tensor, block: int,
                                   density: float, threshold: float, sinks: int, local: int,
                                   scale: float) -> Tensor:
    """``estimate_attention_blocks`` step by step as ``estimate_blocks_reference``."""
    far = 1 << 62
    group = _group(q, k)
    filled_keys = op.Where(op.GreaterOrEqual(kv_positions, _ints(0)), kv_positions, _ints(far))
    q_low = op.Unsqueeze(_ranges(q_positions, block, far, op.ReduceMin), _ints(1, 3))  # [B, 1, QB, 1]
    q_high = op.Unsqueeze(_ranges(q_positions, block, -1, op.ReduceMax), _ints(1, 3))
    k_low = op.Unsqueeze(_ranges(filled_keys, block, far, op.ReduceMin), _ints(1, 2))  # [B, 1, 1, KB]
    k_high = op.Unsqueeze(_ranges(kv_positions, block, -1, op.ReduceMax), _ints(1, 2))
    reach = op.And(op.LessOrEqual(k_low, k_high), op.LessOrEqual(k_low, q_high))
    reach = op.Expand(reach, op.Concat(_dim(q, 0), _dim(q, 1), op.Shape(reach, start=2), axis=0))
    key_blocks = op.Shape(reach, start=3, end=4)
    numbers = op.Expand(_arange(key_blocks), op.Shape(reach))

    def table(keep: ir.Value) -> ir.Value:
        ordered, _ = op.TopK(op.Where(keep, numbers, key_blocks), key_blocks, axis=-1, largest=0, sorted=1)
        return op.Where(op.Equal(ordered, key_blocks), _ints(-1), ordered)

    ones = op.Expand(_float(1.0), op.Concat(_dim(q, 0), _ints(1), _dim(q, 2), axis=0))
    filled = op.Cast(op.Unsqueeze(op.GreaterOrEqual(kv_positions, _ints(0)), _ints(1)), to=FLOAT)
    pooled_k = _per_query_head(_pooled(_as_float(k), block, filled), group)
    scores = op.Mul(op.MatMul(_pooled(_as_float(q), block, ones), op.Transpose(pooled_k, perm=[0, 1, 3, 2])),
                    _float(scale))
    scores = op.Where(reach, scores, _float(float("-inf")))
    top = op.ReduceMax(scores, _ints(-1), keepdims=1)
    weights = op.Where(reach, op.Exp(op.Sub(scores, op.Where(op.IsInf(top), _float(0.0), top))), _float(0.0))
    total = op.ReduceSum(weights, _ints(-1), keepdims=1)
    share = op.Div(weights, op.Where(op.Greater(total, _float(0.0)), total, _float(1.0)))
    forced = op.And(reach, op.Or(op.Less(k_low, _ints(sinks)),
                                 op.GreaterOrEqual(k_high, op.Sub(q_low, _ints(local * block)))))
    priority = op.Where(forced, _float(2.0), op.Where(reach, share, _float(-1.0)))
    _, ranked = op.TopK(priority, key_blocks, axis=-1, largest=1, sorted=1)
    rank = op.ScatterElements(numbers, ranked, numbers, axis=-1)
    if density > 0:
        budget = op.Ceil(op.Mul(op.ReduceSum(op.Cast(reach, to=FLOAT), _ints(-1), keepdims=1), _float(density)))
        budget = op.Max(budget, op.ReduceSum(op.Cast(forced, to=FLOAT), _ints(-1), keepdims=1))
        keep = op.Less(op.Cast(rank, to=FLOAT), budget)
    else:
        sorted_share = op.GatherElements(share, ranked, axis=-1)
        before = op.Sub(op.CumSum(sorted_share, op.Constant(value_int=-1)), sorted_share)
        keep = op.Or(op.GatherElements(op.Less(before, _float(threshold)), rank, axis=-1), forced)
    sparse = table(op.And(keep, reach))
    # fewer queries than a block: every reachable block
    short = op.Less(_dim(q, 2), _ints(block))
    return op.Where(short, table(reach), sparse)


def _dequantized(codes: ir.Value, params: ir.Value | None, bits: int, group_size: int) -> ir.Value:
    """The cache's keys or values as float32 [..., D] (``dequantize_kv_reference``)."""
    if bits == 0:
        return _as_float(codes)
    if bits == 8:
        values = op.Cast(codes, to=FLOAT)
    else:
        low = op.BitwiseAnd(codes, op.Constant(value=ir.tensor(np.array(15, dtype=np.uint8))))
        high = op.BitShift(codes, op.Constant(value=ir.tensor(np.array(4, dtype=np.uint8))), direction="RIGHT")
        pairs = op.Concat(op.Unsqueeze(low, _ints(-1)), op.Unsqueeze(high, _ints(-1)), axis=-1)
        values = op.Cast(op.Reshape(pairs, op.Concat(op.Shape(codes, start=0, end=-1), _ints(-1), axis=0)), to=FLOAT)
    groups = op.Reshape(values, op.Concat(op.Shape(values, start=0, end=-1), _ints(-1, group_size), axis=0))
    scale = op.Slice(params, _ints(0), _ints(1), _ints(-1))
    out = op.Mul(groups, scale)
    if bits == 4:
        out = op.Add(out, op.Slice(params, _ints(1), _ints(2), _ints(-1)))
    return op.Reshape(out, op.Shape(values))


def cache_attention_onnx(q: Tensor, k: Tensor, v: Tensor, k_params: Tensor | None, v_params: Tensor | None,
                         q_positions: Tensor, kv_positions: Tensor, window: list[int], sinks: list[int], scale: float,
                         bits: int, group_size: int, with_mass: bool) -> tuple[Tensor, Tensor]:
    """``cache_attention`` as dequantization and masked dense attention (see the module docstring)."""
    group = _group(q, k)
    keys = _per_query_head(_dequantized(k, k_params, bits, group_size), group)
    values = _per_query_head(_dequantized(v, v_params, bits, group_size), group)
    mask = _position_rule(q_positions, kv_positions, window, sinks)
    out, weights = _masked_attention(_as_float(q), keys, values, mask, scale)
    if not with_mass:
        return _like(out, q), op.Constant(value=ir.tensor(np.zeros(0, dtype=np.float32)))
    per_kv_head = op.Reshape(weights, op.Concat(_dim(q, 0), _dim(k, 1), _ints(-1), _dim(k, 2), axis=0))
    return _like(out, q), op.ReduceSum(per_kv_head, _ints(2), keepdims=0)


def quantize_kv_onnx(x: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor]:
    """``quantize_kv_reference`` in ONNX ops."""
    values = _as_float(x)
    groups = op.Reshape(values, op.Concat(op.Shape(values, start=0, end=-1), _ints(-1, group_size), axis=0))
    zero, one = _float(0.0), _float(1.0)
    if bits == 8:
        scale = op.Div(op.ReduceMax(op.Abs(groups), _ints(-1), keepdims=1), _float(127.0))
        safe = op.Where(op.Greater(scale, zero), scale, one)
        codes = op.Clip(op.Round(op.Div(groups, safe)), _float(-127.0), _float(127.0))
        return op.Cast(op.Reshape(codes, op.Shape(values)), to=INT8), scale
    low = op.ReduceMin(groups, _ints(-1), keepdims=1)
    scale = op.Div(op.Sub(op.ReduceMax(groups, _ints(-1), keepdims=1), low), _float(15.0))
    safe = op.Where(op.Greater(scale, zero), scale, one)
    codes = op.Cast(op.Clip(op.Round(op.Div(op.Sub(groups, low), safe)), zero, _float(15.0)), to=UINT8)
    pairs = op.Reshape(codes, op.Concat(op.Shape(values, start=0, end=-1), _ints(-1, 2), axis=0))
    even = op.Squeeze(op.Slice(pairs, _ints(0), _ints(1), _ints(-1)), _ints(-1))
    odd = op.Squeeze(op.Slice(pairs, _ints(1), _ints(2), _ints(-1)), _ints(-1))
    four = op.Constant(value=ir.tensor(np.array(4, dtype=np.uint8)))
    packed = op.BitwiseOr(even, op.BitShift(odd, four, direction="LEFT"))
    return packed, op.Concat(scale, low, axis=-1)


def dequantize_kv_onnx(codes: Tensor, params: Tensor, bits: int, group_size: int, dtype: torch.dtype) -> Tensor:
    """``dequantize_kv_reference`` in ONNX ops."""
    out = _dequantized(codes, params, bits, group_size)
    # the exporter hands dtype arguments over as ONNX data types already
    target = dtype if isinstance(dtype, ir.DataType) else _DTYPES[dtype]
    return out if target == FLOAT else op.Cast(out, to=target)


_DTYPES = {torch.float32: FLOAT, torch.float16: ir.DataType.FLOAT16, torch.bfloat16: ir.DataType.BFLOAT16}


ONNX_TRANSLATIONS.update({
    torch.ops.bevel.sparse_attention.default: sparse_attention_onnx,
    torch.ops.bevel.estimate_attention_blocks.default: estimate_attention_blocks_onnx,
    torch.ops.bevel.cache_attention.default: cache_attention_onnx,
    torch.ops.bevel.quantize_kv.default: quantize_kv_onnx,
    torch.ops.bevel.dequantize_kv.default: dequantize_kv_onnx,
})
