"""``bevel::int8_weight_linear``: a linear with int8 per-channel weights; activations stay in float.

``y = x @ (qweight * scale[:, None]).T + bias`` in ``x``'s dtype (formats in ``quant_format``).
CPU: integer GEMMs (fbgemm or oneDNN) with each token carried as two int8 digits (``cpu_integer_linear``);
CUDA: the fused dequantize-matmul Triton kernel; ONNX: ``DequantizeLinear`` feeding ``MatMul``.
"""

from __future__ import annotations

import torch

from bevel.runtime.ops import cpu_integer_linear
from bevel.runtime.ops.quant_format import dequantize_int8_per_channel


def int8_weight_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                                 bias: torch.Tensor | None) -> torch.Tensor:
    """The op's meaning in plain torch: dequantize the weight, then a float32 linear."""
    weight = dequantize_int8_per_channel(qweight, scale)
    out = torch.nn.functional.linear(x.float(), weight, None if bias is None else bias.float())
    return out.to(x.dtype)


@torch.library.custom_op("bevel::int8_weight_linear", mutates_args=())
def int8_weight_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] times an int8 weight [N, K] with float32 scales [N], plus an optional bias [N]."""
    if x.device.type == "cpu" and cpu_integer_linear.available():
        packed = cpu_integer_linear.packed_weight(qweight, (scale,), lambda: (qweight, scale))
        return cpu_integer_linear.float_activation_linear(x, packed, bias).to(x.dtype)
    return int8_weight_linear_reference(x, qweight, scale, bias)


@int8_weight_linear.register_fake
def _(x, qweight, scale, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@int8_weight_linear.register_kernel("cuda")
def _(x, qweight, scale, bias):
    from bevel.codegen.kernels.quantized_linear import triton_int8_weight_linear

    return triton_int8_weight_linear(x, qweight, scale, bias)
