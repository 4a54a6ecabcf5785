"""``bevel::int4_weight_linear``: a linear with 4-bit group-quantized weights; activations stay in float.

``w = (q - zero) * scale`` per group of ``group_size`` input columns, two codes per byte (formats in
``quant_format``); ``y = x @ w.T + bias`` in ``x``'s dtype. CUDA: the fused dequantize-matmul Triton
kernel; ONNX: ONNX Runtime's ``com.microsoft::MatMulNBits``, whose layout the weights already have.

CPU: group-wise scales do not fit one integer GEMM (per-group GEMMs took 199 ms against 34 ms for
fp32 on a [4096, 384] x [384, 1536] linear), so the dequantized weight is put once, when it is first
used, on an int8 grid per output row and run through the int8 path of ``int8_weight_linear``. That
second rounding adds at most half an int8 step of the row's largest weight, about a sixteenth of a
4-bit step; the op's tests bound the difference to the reference.
"""

from __future__ import annotations

import torch

from bevel.runtime.ops import cpu_integer_linear
from bevel.runtime.ops.quant_format import dequantize_int4_groups, quantize_int8_per_channel


def int4_weight_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                                 group_size: int, bias: torch.Tensor | None) -> torch.Tensor:
    """The op's meaning in plain torch: dequantize the groups, then a float32 linear."""
    weight = dequantize_int4_groups(qweight, scale, zero, group_size)
    out = torch.nn.functional.linear(x.float(), weight, None if bias is None else bias.float())
    return out.to(x.dtype)


@torch.library.custom_op("bevel::int4_weight_linear", mutates_args=())
def int4_weight_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                       group_size: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] times a 4-bit weight: qweight uint8 [N, K // 2], scale float16 [N, K // group_size],
    zero uint8 [N, ceil(K // group_size / 2)]; plus an optional bias [N]."""
    if x.device.type == "cpu" and cpu_integer_linear.available():
        def as_int8():
            return quantize_int8_per_channel(dequantize_int4_groups(qweight, scale, zero, group_size))

        packed = cpu_integer_linear.packed_weight(qweight, (scale, zero), as_int8)
        return cpu_integer_linear.float_activation_linear(x, packed, bias).to(x.dtype)
    return int4_weight_linear_reference(x, qweight, scale, zero, group_size, bias)


@int4_weight_linear.register_fake
def _(x, qweight, scale, zero, group_size, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@int4_weight_linear.register_kernel("cuda")
def _(x, qweight, scale, zero, group_size, bias):
    from bevel.codegen.kernels.quantized_linear import triton_int4_weight_linear

    return triton_int4_weight_linear(x, qweight, scale, zero, group_size, bias)
