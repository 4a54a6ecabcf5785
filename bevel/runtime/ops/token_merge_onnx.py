"""The ONNX face of bevel's token merging ops: onnxscript translations registered into ``ONNX_TRANSLATIONS``.

- ``bipartite_match``: cosine similarities by ``MatMul``, each A token's best B by ``ReduceMax``/``ArgMax``,
  the removed tokens by ``TopK`` of the removal scores, the slots by ``CumSum`` of the kept ones.
- ``merge_tokens``: size-weighted sums per slot by ``ScatterElements(reduction="add")``, then a division.
- ``drop_padding``: each token's slot from ``CumSum`` of the real and of the padding tokens, the tokens
  in slot order by ``ScatterElements`` of the inverse permutation, cut to the longest row by ``Slice``.
- ``unmerge_tokens``: ``GatherElements`` of each original token's slot.

The batch and token counts are dynamic in an exported model, so every length that depends on them
(the clamped ``r``, the merged length) is computed at run time from ``Shape``; ``r`` and ``protect``
are Python ints, fixed in the file. The computations follow the ops' references step by step
(``bevel.runtime.ops.token_merge``), tie-breaking included, so the plans (``dest``) are the same.
"""

from __future__ import annotations

import onnx_ir as ir
import torch
from onnxscript import opset18 as op
from onnxscript.onnx_types import TensorType

from bevel.runtime.ops import ONNX_TRANSLATIONS
from bevel.runtime.ops.token_merge import PADDING_SCORE

FLOAT = ir.DataType.FLOAT
# What the translations' signatures say their tensors are: torch.onnx reads these annotations to
# build each function's ONNX signature (any tensor type); at export they receive ir.Values.
Tensor = TensorType


def _ints(*values: int) -> ir.Value:
    """A 1-D int64 constant: shapes, axes and lengths are 1-D int64 tensors in ONNX."""
    return op.Constant(value_ints=list(values))


def _dim(value: ir.Value, axis: int) -> ir.Value:
    """The size of one dimension of ``value`` at run time, as a 1-D int64 tensor of one element."""
    return op.Shape(value, start=axis, end=axis + 1)


def _as_float(value: ir.Value) -> ir.Value:
    return value if value.dtype == FLOAT else op.Cast(value, to=FLOAT)


def _like(out: ir.Value, x: ir.Value) -> ir.Value:
    """``out`` (float32) in ``x``'s dtype, as the references' ``.to(x.dtype)``."""
    return out if x.dtype in (FLOAT, None) else op.Cast(out, to=x.dtype)


def _positions(count: ir.Value) -> ir.Value:
    """``arange(count)`` (int64 [count]) for a 1-D count: Range takes scalars."""
    return op.Range(op.Constant(value_int=0), op.Squeeze(count, _ints(0)), op.Constant(value_int=1))


def _clamped_r(tokens: ir.Value, r: int, protect: int) -> ir.Value:
    """token_merge.clamped_r at run time: ``min(r, max(tokens - protect, 0) // 2, max(tokens - 2, 0))``
    ([1] int64; the integer Div truncates, which is floor here since its operand is not negative)."""
    free = op.Max(op.Sub(tokens, _ints(protect)), _ints(0))
    return op.Min(op.Min(_ints(r), op.Div(free, _ints(2))), op.Max(op.Sub(tokens, _ints(2)), _ints(0)))


def _token_index(index: ir.Value, channels_of: ir.Value) -> ir.Value:
    """A [B, L] token index broadcast over the channels of ``channels_of`` [.., .., C]: [B, L, C], for
    GatherElements/ScatterElements along the tokens (torch's ``index.unsqueeze(-1).expand(...)``)."""
    shape = op.Concat(op.Shape(index), _dim(channels_of, 2), axis=0)
    return op.Expand(op.Unsqueeze(index, _ints(-1)), shape)


def bipartite_match_onnx(metric: Tensor, size: Tensor, r: int, protect: int) -> Tensor:
    """``dest`` [B, N] int64, as ``bipartite_match_reference``.

    The similarity of every pair [B, N, N] is computed and masked to the columns of real B tokens,
    as in the reference; ``ArgMax`` keeps the first best column like torch's ``max``. ``TopK`` takes
    its K as a tensor, so the clamped r comes from the run-time token count; with K = 0 nothing is
    removed and the slots are ``arange(N)``, as the reference's early return. Removed tokens always
    have a finite score (there are at least r A tokens or padding tokens to remove), so the set TopK
    picks does not depend on how it breaks ties among the -inf scores.
    """
    tokens = _dim(metric, 1)
    remove = _clamped_r(tokens, r, protect)
    minus_inf = op.Constant(value_float=float("-inf"))

    values = _as_float(metric)
    norm = op.Sqrt(op.ReduceSum(op.Mul(values, values), _ints(-1), keepdims=1))
    unit = op.Div(values, op.Max(norm, op.Constant(value_float=1e-12)))
    similarity = op.MatMul(unit, op.Transpose(unit, perm=[0, 2, 1]))  # [B, N, N]

    # the sides: after the protected tokens, even offsets are A and odd ones are B
    position = _positions(tokens)
    free = op.GreaterOrEqual(position, _ints(protect))
    odd = op.Equal(op.Mod(op.Sub(position, _ints(protect)), _ints(2)), _ints(1))
    side_a, side_b = op.And(free, op.Not(odd)), op.And(free, odd)
    real = op.Greater(_as_float(size), op.Constant(value_float=0.0))  # [B, N]

    # only columns of real B tokens count: [B, 1, N] broadcast over the rows
    similarity = op.Where(op.Unsqueeze(op.And(side_b, real), _ints(1)), similarity, minus_inf)
    best = op.ReduceMax(similarity, _ints(-1), keepdims=0)
    best_position = op.ArgMax(similarity, axis=-1, keepdims=0)
    score = op.Where(op.And(side_a, real), best, minus_inf)
    # padding goes first, later padding before earlier: PADDING_SCORE + position beats every cosine
    padding_score = op.Add(op.Constant(value_float=PADDING_SCORE), op.Cast(position, to=FLOAT))
    score = op.Where(op.And(free, op.Not(real)), padding_score, score)
    _, removed = op.TopK(score, remove, axis=1, largest=1, sorted=1)

    # kept: ones with zeros scattered at the removed tokens (int64, as CumSum takes no bool)
    kept = op.Expand(_ints(1), op.Shape(size))
    kept = op.ScatterElements(kept, removed, op.Expand(_ints(0), op.Shape(removed)), axis=1)
    prefix = op.Sub(op.CumSum(kept, op.Constant(value_int=1)), _ints(1))  # the last kept token's slot
    stays = op.Or(op.Cast(kept, to=ir.DataType.BOOL), op.Not(real))
    merged = op.GatherElements(prefix, best_position, axis=1)
    return op.Where(stays, op.Max(prefix, _ints(0)), merged)


def merge_tokens_onnx(x: Tensor, size: Tensor, dest: Tensor, r: int, protect: int) -> tuple[Tensor, Tensor]:
    """``(x', size')`` [B, M, C] and [B, M], as ``merge_tokens_reference``.

    ``ScatterElements(reduction="add")`` sums the sizes and the size-weighted tokens of each slot into
    zeros of the merged length M = N - clamped r (from the run-time N), in float32; the division by
    the slot's size, clamped to the smallest normal float, leaves padding-only slots at zero.
    """
    tokens = _dim(x, 1)
    slots = op.Sub(tokens, _clamped_r(tokens, r, protect))
    weight = _as_float(size)
    zero = op.Constant(value_float=0.0)

    total = op.Expand(zero, op.Concat(_dim(x, 0), slots, axis=0))
    total = op.ScatterElements(total, dest, weight, axis=1, reduction="add")
    summed = op.Expand(zero, op.Concat(_dim(x, 0), slots, _dim(x, 2), axis=0))
    weighted = op.Mul(_as_float(x), op.Unsqueeze(weight, _ints(-1)))
    summed = op.ScatterElements(summed, _token_index(dest, x), weighted, axis=1, reduction="add")
    tiny = op.Constant(value_float=float(torch.finfo(torch.float32).tiny))
    out = op.Div(summed, op.Unsqueeze(op.Max(total, tiny), _ints(-1)))
    return _like(out, x), total


def drop_padding_onnx(x: Tensor, size: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(x', size', dest)`` [B, M, C], [B, M] and [B, N], as ``drop_padding_reference``.

    The reference's stable argsort of "is padding" puts real tokens first, each kind in its order, so
    a token's rank (its place in that order) is the number of real tokens before it if it is real,
    and all the row's real tokens plus the padding before it if not: two ``CumSum``s, no sort. The
    order itself is the inverse permutation of the ranks (``ScatterElements`` of the positions at
    the ranks), cut to the M = max(most real tokens of a row, 1) first.
    """
    tokens = _dim(size, 1)
    real = op.Cast(op.Greater(_as_float(size), op.Constant(value_float=0.0)), to=ir.DataType.INT64)
    padding = op.Sub(_ints(1), real)
    axis = op.Constant(value_int=1)
    real_count = op.ReduceSum(real, _ints(1), keepdims=1)  # [B, 1]
    rank = op.Where(op.Cast(real, to=ir.DataType.BOOL), op.Sub(op.CumSum(real, axis), _ints(1)),
                    op.Add(real_count, op.Sub(op.CumSum(padding, axis), _ints(1))))
    # the longest row, at least two tokens where there are two (ReduceMax over an empty batch gives
    # the lowest int64)
    at_least = op.Min(op.Squeeze(_dim(x, 1), _ints(0)), op.Constant(value_int=2))
    slots = op.Max(op.ReduceMax(real_count, keepdims=0), at_least)  # scalar
    dest = op.Min(rank, op.Sub(slots, op.Constant(value_int=1)))

    positions = op.Expand(_positions(tokens), op.Shape(size))
    order = op.ScatterElements(positions, rank, positions, axis=1)  # order[b, rank[b, i]] = i
    kept = op.Slice(order, _ints(0), op.Unsqueeze(slots, _ints(0)), _ints(1))
    return op.GatherElements(x, _token_index(kept, x), axis=1), op.GatherElements(size, kept, axis=1), dest


def unmerge_tokens_onnx(x: Tensor, source: Tensor) -> Tensor:
    """``x[b, source[b, i]]`` for every original token: ``GatherElements`` along the tokens, as
    ``unmerge_tokens_reference``."""
    return op.GatherElements(x, _token_index(source, x), axis=1)


ONNX_TRANSLATIONS.update({
    torch.ops.bevel.bipartite_match.default: bipartite_match_onnx,
    torch.ops.bevel.merge_tokens.default: merge_tokens_onnx,
    torch.ops.bevel.drop_padding.default: drop_padding_onnx,
    torch.ops.bevel.unmerge_tokens.default: unmerge_tokens_onnx,
})
