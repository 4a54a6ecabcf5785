"""The ONNX face of bevel's quantized ops: onnxscript translations registered into ``ONNX_TRANSLATIONS``.

- ``int8_weight_linear``: QDQ, a ``DequantizeLinear`` of the int8 weight, transposed, feeding ``MatMul``.
- ``int4_weight_linear``: ONNX Runtime's ``com.microsoft::MatMulNBits``, whose layout the weights have.
- ``int8_dynamic_linear``: the per-token quantization written out, then ``MatMulInteger``.
- ``int8_embedding``: ``Gather`` of codes and of row scales, then ``Mul``.
- ``int4_embedding``: ``Gather`` of the packed rows, their scales and zero points, unpacked with
  ``BitwiseAnd``/``BitShift``, then ``(q - zero) * scale``.

torch.onnx's exporter calls each function with ``ir.Value`` inputs (``None`` for an absent optional
tensor) while recording the ops it calls, so plain Python decides what is written. Every function
computes in float32 and casts back to the input's dtype, as the ops' references do; quantized
weights stay int8/uint8 initializers in the file (that is the point: its size).
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import torch
from onnxscript import opset18 as op
from onnxscript import values
from onnxscript.onnx_types import TensorType

from bevel.runtime.ops import ONNX_TRANSLATIONS
from bevel.runtime.ops.quant_format import TOKEN_SCALE_EPS

FLOAT = ir.DataType.FLOAT
# What the translations' signatures say their tensors are: torch.onnx reads these annotations to
# build each function's ONNX signature (any tensor type); at export they receive ir.Values.
Tensor = TensorType


def _matmul_nbits_schema() -> onnx.defs.OpSchema:
    """``com.microsoft::MatMulNBits`` as ONNX Runtime declares it: onnx has no schema for ORT's contrib
    ops and onnxscript records only ops with one. Inputs in ORT's order (A, B, scales, zero_points,
    g_idx, bias); only what the translation writes needs to be exact."""
    param = onnx.defs.OpSchema.FormalParameter
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    attr = onnx.defs.OpSchema.Attribute
    integer = onnx.defs.OpSchema.AttrType.INT
    return onnx.defs.OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[param("A", "T1"), param("B", "T2"), param("scales", "T1"),
                param("zero_points", "T3", param_option=optional), param("g_idx", "T4", param_option=optional),
                param("bias", "T1", param_option=optional)],
        outputs=[param("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "A, scales, bias, Y"),
                          ("T2", ["tensor(uint8)"], "packed B"),
                          ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)", "tensor(bfloat16)"],
                           "zero points"),
                          ("T4", ["tensor(int32)"], "group index")],
        attributes=[attr("K", integer, "input features"), attr("N", integer, "output features"),
                    attr("bits", integer, "bits per weight"), attr("block_size", integer, "group size"),
                    attr("accuracy_level", integer, "0: float activations", required=False)],
    )


_MATMUL_NBITS = values.Op(values.Opset("com.microsoft", 1), "MatMulNBits", _matmul_nbits_schema())


def _as_float(value: ir.Value) -> ir.Value:
    return value if value.dtype == FLOAT else op.Cast(value, to=FLOAT)


def _like(out: ir.Value, x: ir.Value) -> ir.Value:
    """``out`` (float32) in ``x``'s dtype, as the references' ``.to(x.dtype)``."""
    return out if x.dtype in (FLOAT, None) else op.Cast(out, to=x.dtype)


def _plus_bias(out: ir.Value, bias: ir.Value | None) -> ir.Value:
    return out if bias is None else op.Add(out, _as_float(bias))


def _last_axis() -> ir.Value:
    return op.Constant(value_ints=[-1])


def _shape(value: ir.Value) -> list[int]:
    """The static shape of a weight input (weights are parameters or buffers: their shapes are fixed)."""
    return [int(d) for d in value.shape]


def int8_weight_linear_onnx(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """``MatMul(x, Transpose(DequantizeLinear(qweight, scale, axis=0))) + bias``.

    The transpose comes after the dequantize on purpose. ``DequantizeLinear`` of a constant [K, N]
    weight feeding ``MatMul`` is what ORT's optimizer (level extended, on by default) rewrites into
    an 8-bit ``MatMulNBits`` whose ``accuracy_level`` defaults to 4 (session option
    ``session.qdq_matmulnbits_accuracy_level``), which quantizes the activations to int8 too: 0.5%
    relative error on a random [128, 256] linear, against float rounding (~1e-7) for the op itself.
    Dequantize-then-transpose is left alone (ORT turns the transpose into its ``FusedMatMul``'s
    transB), so every ORT session gets the op's meaning; the weight stays an int8 initializer and
    is dequantized per run.
    """
    weight = op.Transpose(op.DequantizeLinear(qweight, _as_float(scale), axis=0), perm=[1, 0])
    return _like(_plus_bias(op.MatMul(_as_float(x), weight), bias), x)


def _is_matmul_nbits_block(group_size: int) -> bool:
    # ORT's MatMulNBits refuses other block sizes (matmul_nbits_helper.h: a power of 2, >= 16)
    return group_size >= 16 and group_size & (group_size - 1) == 0


def _unpacked_int4(packed: ir.Value, lead_rank: int, packed_bytes: int, length: int) -> ir.Value:
    """quant_format.unpack_int4 in ONNX: the codes of a packed [..., packed_bytes] uint8 tensor with
    ``lead_rank`` leading dimensions as float32 [..., length] (the low nibble first). The leading
    dimensions need not be static: Reshape's 0 copies them (an embedding's index shape is dynamic)."""
    low = op.BitwiseAnd(packed, op.Constant(value=ir.tensor(0x0F, dtype=ir.DataType.UINT8)))
    high = op.BitShift(packed, op.Constant(value=ir.tensor(4, dtype=ir.DataType.UINT8)), direction="RIGHT")
    both = op.Concat(op.Unsqueeze(low, _last_axis()), op.Unsqueeze(high, _last_axis()), axis=-1)
    codes = op.Reshape(both, op.Constant(value_ints=[0] * lead_rank + [2 * packed_bytes]))
    if packed_bytes * 2 != length:  # an odd count carries a padding nibble at the end
        codes = op.Slice(codes, op.Constant(value_ints=[0]), op.Constant(value_ints=[length]), _last_axis())
    return op.Cast(codes, to=FLOAT)


def _dequantized_int4(qweight: ir.Value, scale: ir.Value, zero: ir.Value, group_size: int) -> ir.Value:
    """quant_format.dequantize_int4_groups in ONNX, for the block sizes MatMulNBits does not take: the
    float32 [N, K] weight, computed from the packed one (ORT's constant folding makes it a float32
    initializer at load; the exporter's already does for weights under 8192 elements)."""
    n, groups = _shape(scale)
    codes = op.Reshape(_unpacked_int4(qweight, 1, _shape(qweight)[1], groups * group_size),
                       op.Constant(value_ints=[n, groups, group_size]))
    zeros = op.Unsqueeze(_unpacked_int4(zero, 1, _shape(zero)[1], groups), _last_axis())
    weight = op.Mul(op.Sub(codes, zeros), op.Unsqueeze(_as_float(scale), _last_axis()))
    return op.Reshape(weight, op.Constant(value_ints=[n, groups * group_size]))


def int4_weight_linear_onnx(x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor, group_size: int,
                            bias: Tensor | None) -> Tensor:
    """``com.microsoft::MatMulNBits(x, qweight as [N, groups, group_size // 2], scale, zero, bias)``.

    Our storage is ORT's: a row of qweight is its groups' blobs back to back, low nibble first;
    scale [N, groups] and the per-row packed zero [N, ceil(groups / 2)] are shapes its checks accept
    as they are. B must be 3-D, hence the Reshape; it is of an initializer with a constant shape, which
    ORT's constant folding turns into an initializer at load, before MatMulNBits prepacks B (the
    exporter folds it only under 8192 elements). ``accuracy_level`` stays 0: float activations, as
    the op means. Block sizes ORT refuses fall back to dequantizing in the graph, then ``MatMul``.
    """
    n, groups = _shape(scale)
    k = groups * group_size
    if not _is_matmul_nbits_block(group_size):
        weight = op.Transpose(_dequantized_int4(qweight, scale, zero, group_size), perm=[1, 0])
        return _like(_plus_bias(op.MatMul(_as_float(x), weight), bias), x)
    blobs = op.Reshape(qweight, op.Constant(value_ints=[n, groups, group_size // 2]))
    out = _MATMUL_NBITS(_as_float(x), blobs, _as_float(scale), zero, None,
                        None if bias is None else _as_float(bias),
                        K=k, N=n, bits=4, block_size=group_size, accuracy_level=0)
    return _like(out, x)


def int8_dynamic_linear_onnx(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None,
                             input_scale: Tensor | None, bits: int = 8) -> Tensor:
    """quant_format.quantize_per_token written out, then ``MatMulInteger`` on int8 x int8 codes.

    Same float32 operations in the same order as the reference (ONNX ``Round`` is half to even, like
    torch.round; ``Div`` is IEEE), so the codes match. The zero points' share, ``zero * row sum of
    qweight``, is taken off the int32 sums in int32 (exact; the row sums are a constant the runtime
    folds at load), then the sums are scaled as ``sums * token_scale * scale`` like the reference.
    MatMulInteger's own zero point for A is one per tensor in ONNX Runtime, not per token. The
    weight's transpose folds into a [K, N] int8 initializer.
    """
    xs = _as_float(x)
    if input_scale is not None:
        xs = op.Mul(xs, _as_float(input_scale))
    origin = op.Constant(value_float=0.0)
    high = op.Max(op.ReduceMax(xs, _last_axis(), keepdims=1), origin)
    low = op.Min(op.ReduceMin(xs, _last_axis(), keepdims=1), origin)
    half = 2 ** (bits - 1)
    token_scale = op.Div(op.Max(op.Sub(high, low), op.Constant(value_float=TOKEN_SCALE_EPS)),
                         op.Constant(value_float=float(2 * half - 1)))
    zero = op.Sub(op.Round(op.Div(op.Neg(low), token_scale)), op.Constant(value_float=float(half)))
    codes = op.Clip(op.Round(op.Add(op.Div(xs, token_scale), zero)), op.Constant(value_float=float(-half)),
                    op.Constant(value_float=float(half - 1)))
    weight = op.Transpose(qweight, perm=[1, 0])  # read only through its transpose, which then folds
    sums = op.MatMulInteger(op.Cast(codes, to=ir.DataType.INT8), weight)
    row_sums = op.ReduceSum(op.Cast(weight, to=ir.DataType.INT32), op.Constant(value_ints=[0]), keepdims=0)
    sums = op.Sub(sums, op.Mul(op.Cast(zero, to=ir.DataType.INT32), row_sums))
    out = op.Mul(op.Mul(op.Cast(sums, to=FLOAT), token_scale), _as_float(scale))
    return _like(_plus_bias(out, bias), x)


def int8_embedding_onnx(qweight: Tensor, scale: Tensor, indices: Tensor) -> Tensor:
    """``Cast(Gather(qweight, indices)) * Unsqueeze(Gather(scale, indices), -1)``, float32 like the op."""
    codes = op.Cast(op.Gather(qweight, indices, axis=0), to=FLOAT)
    row_scales = op.Gather(_as_float(scale), indices, axis=0)
    return op.Mul(codes, op.Unsqueeze(row_scales, _last_axis()))


def int4_embedding_onnx(qweight: Tensor, scale: Tensor, zero: Tensor, group_size: int, indices: Tensor) -> Tensor:
    """``Gather`` of the packed rows, their scales and packed zero points, then ``(q - zero) * scale``.

    Only the gathered rows are unpacked and dequantized, so the table stays a uint8 initializer
    (ORT's contrib ``GatherBlockQuantized`` could do it in one node, but it exists only in ORT and
    its int4 conventions are not pinned to ours here; plain ONNX runs in any runtime). The codes and
    zero points are small integers, exact in float32, so ``(q - zero) * scale`` rounds once, as in
    the reference: the same values, bit for bit. Reshapes copy the index dimensions with 0, so the indices keep a
    dynamic shape (only their rank is fixed by the export).
    """
    groups = _shape(scale)[1]
    dim = groups * group_size
    lead = [0] * len(indices.shape)  # the index dimensions, copied
    codes = _unpacked_int4(op.Gather(qweight, indices, axis=0), len(lead), _shape(qweight)[1], dim)
    codes = op.Reshape(codes, op.Constant(value_ints=lead + [groups, group_size]))
    zeros = _unpacked_int4(op.Gather(zero, indices, axis=0), len(lead), _shape(zero)[1], groups)
    row_scales = op.Gather(_as_float(scale), indices, axis=0)
    out = op.Mul(op.Sub(codes, op.Unsqueeze(zeros, _last_axis())), op.Unsqueeze(row_scales, _last_axis()))
    return op.Reshape(out, op.Constant(value_ints=lead + [dim]))


ONNX_TRANSLATIONS.update({
    torch.ops.bevel.int8_weight_linear.default: int8_weight_linear_onnx,
    torch.ops.bevel.int4_weight_linear.default: int4_weight_linear_onnx,
    torch.ops.bevel.int8_dynamic_linear.default: int8_dynamic_linear_onnx,
    torch.ops.bevel.int8_embedding.default: int8_embedding_onnx,
    torch.ops.bevel.int4_embedding.default: int4_embedding_onnx,
})
