"""``bevel::int8_dynamic_linear``: W8A8, activations quantized per token at run time, weights per channel.

``x' = x * input_scale`` (SmoothQuant's per-input-channel migration, when given), then per token
asymmetric codes ``xq`` of ``bits`` bits (8, or 7) with scale ``s`` and zero point ``zero``
(``quant_format.quantize_per_token``);
``y = ((xq - zero) @ qweight.T) * s * scale + bias`` in ``x``'s dtype, the sums computed as
``xq @ qweight.T - zero * qweight.sum(1)``. CPU: an int8 GEMM (fbgemm or oneDNN) on the codes
(``cpu_integer_linear``), exact integer sums; CUDA: a Triton kernel; ONNX: per-token quantization written
out, then ``MatMulInteger``.
"""

from __future__ import annotations

import torch

from bevel.runtime.ops import cpu_integer_linear
from bevel.runtime.ops.quant_format import check_token_bits, quantize_per_token


def _smoothed(x: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
    return x.float() if input_scale is None else x.float() * input_scale.float()


def int8_dynamic_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                                  bias: torch.Tensor | None, input_scale: torch.Tensor | None,
                                  bits: int = 8) -> torch.Tensor:
    """The op's meaning in plain torch: per-token codes times int8 weights, summed exactly
    (float64 holds every int32 sum), scaled back to float."""
    codes, token_scale, zero = quantize_per_token(_smoothed(x, input_scale), bits)
    weight = qweight.double()
    sums = (codes.double() @ weight.T - zero.double() * weight.sum(dim=1)).float()
    out = sums * token_scale * scale.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


@torch.library.custom_op("bevel::int8_dynamic_linear", mutates_args=())
def int8_dynamic_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                        input_scale: torch.Tensor | None, bits: int = 8) -> torch.Tensor:
    """x [..., K] quantized per token to ``bits``-bit codes (8 or 7), times an int8 weight [N, K] with
    float32 scales [N]; optional bias [N] and per-input-channel smoothing factors ``input_scale`` [K]."""
    check_token_bits(bits)
    if x.device.type == "cpu" and cpu_integer_linear.available():
        packed = cpu_integer_linear.packed_weight(
            qweight, (scale,), lambda: (cpu_integer_linear.with_zero_point_columns(qweight), scale), "per_token")
        return cpu_integer_linear.per_token_linear(x, input_scale, packed, bias, bits).to(x.dtype)
    return int8_dynamic_linear_reference(x, qweight, scale, bias, input_scale, bits)


@int8_dynamic_linear.register_fake
def _(x, qweight, scale, bias, input_scale, bits=8):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@int8_dynamic_linear.register_kernel("cuda")
def _(x, qweight, scale, bias, input_scale, bits=8):
    from bevel.codegen.kernels.quantized_linear import triton_int8_dynamic_linear

    check_token_bits(bits)
    return triton_int8_dynamic_linear(x, qweight, scale, bias, input_scale, bits)
