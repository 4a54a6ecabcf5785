"""The CUDA faces of bevel's quantized linears: host wrappers that launch the Triton kernels.

``triton_int8_weight_linear``, ``triton_int4_weight_linear`` and ``triton_int8_dynamic_linear`` keep
the signatures and meaning of their ops' references in ``bevel.runtime.ops``. Each flattens x's
leading dimensions into M rows, takes the decode kernel for M <= DECODE_MAX_ROWS and the prefill
(tiled GEMM) one above, and returns [..., N] in x's dtype. The weight-only linears take the
matrix-vector kernel of ``gemv.py`` for a single row, and from DEQUANTIZE_MIN_ROWS rows of 16-bit
activations on they dequantize the weight in one pass and call cuBLAS instead
(``codegen/kernels/dequantize.py`` says why). Inputs the kernels do not cover (empty
shapes, float64 activations, int4 groups of other than a multiple of 32 columns) go to the plain
torch reference, on whatever device they are: slower, never wrong.
"""

from __future__ import annotations

import torch
import triton

from bevel.codegen.kernels import dequantize, gemv, int8_matmul, weight_only_matmul
from bevel.errors import BevelError

# up to this many rows, one tile of 16 rows covers all of them (the decode kernels' BLOCK_M)
DECODE_MAX_ROWS = 16
# from this many rows of fp16/bf16 activations on, the weight-only linears dequantize the weight and
# call cuBLAS rather than run the fused prefill kernel
DEQUANTIZE_MIN_ROWS = 1024
PREFILL_PATHS = ("auto", "kernel", "dequantize")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """x as a [M, K] tensor with unit stride along K (what the kernels index)."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def _m_bucket(rows: int) -> int:
    """The autotuning key for M: powers of two, so a new prompt length does not retune."""
    return triton.next_power_of_2(rows)


def _grid(rows: int, cols: int):
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]),)


def _check_weight(op: str, x: torch.Tensor, qweight: torch.Tensor, columns: int) -> None:
    if qweight.dim() != 2 or qweight.shape[1] != columns:
        raise BevelError(f"{op}: x has {x.shape[-1]} input features, so qweight should be [N, {columns}]; "
                         f"got {tuple(qweight.shape)}")


def _kernel_takes(x: torch.Tensor, rows: int, cols: int) -> bool:
    return x.dtype in _KERNEL_DTYPES and rows > 0 and cols > 0 and x.shape[-1] > 0


def _dequantizes(x: torch.Tensor, rows: int, prefill: str) -> bool:
    """Whether a weight-only linear of ``rows`` rows dequantizes its weight for cuBLAS (see the module
    docstring); ``prefill`` "kernel" or "dequantize" forces one path (benchmarks compare them)."""
    if prefill not in PREFILL_PATHS:
        raise ValueError(f"prefill must be one of {PREFILL_PATHS}, got {prefill!r}")
    if prefill == "auto":
        return x.dtype in (torch.float16, torch.bfloat16) and rows >= DEQUANTIZE_MIN_ROWS
    return prefill == "dequantize" and rows > DECODE_MAX_ROWS


def _weight_only(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 group_size: int, bias: torch.Tensor | None, prefill: str = "auto") -> torch.Tensor:
    """Launch the dequantize-matmul kernel, or dequantize then cuBLAS; int4 when ``zero`` is given."""
    x2 = _as_rows(x)
    rows, k = x2.shape
    cols = qweight.shape[0]
    int4 = zero is not None
    if _dequantizes(x, rows, prefill) and (not int4 or dequantize.int4_group_size_supported(group_size)):
        weight = (dequantize.dequantize_int4(qweight, scale, zero, group_size, x.dtype) if int4
                  else dequantize.dequantize_int8(qweight, scale, x.dtype))
        bias16 = bias.to(x.dtype) if bias is not None else None
        return torch.nn.functional.linear(x2, weight, bias16).reshape(*x.shape[:-1], cols)
    out = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
    qweight, scale = qweight.contiguous(), scale.contiguous()
    zero = zero.contiguous() if int4 else qweight  # an unread stand-in keeps the signature one type
    bias_arg = bias.contiguous() if bias is not None else scale
    if rows == 1 and (not int4 or gemv.group_size_supported(group_size)):
        out = out.reshape(cols)
        gemv.gemv[lambda meta: (triton.cdiv(cols, meta["BLOCK_N"]),)](
            x2, qweight, scale, zero, bias_arg, out, cols, k, qweight.stride(0), scale.stride(0),
            zero.stride(0) if int4 else 0, int4, group_size, bias is not None)
        return out.reshape(*x.shape[:-1], cols)
    # fp32 activations: three TF32 products per product (split into high and low parts) keep the
    # reference's float32 precision on tensor cores; "ieee" runs on FMA units and spilled registers
    # in every config when compiled for sm_90, and plain TF32 keeps only 10 mantissa bits
    precision = "tf32x3" if x.dtype == torch.float32 else "tf32"
    kernel = weight_only_matmul.decode_matmul if rows <= DECODE_MAX_ROWS else weight_only_matmul.prefill_matmul
    kernel[_grid(rows, cols)](
        x2, qweight, scale, zero, bias_arg, out,
        rows, cols, k, _m_bucket(rows), x2.stride(0), qweight.stride(0), scale.stride(0),
        zero.stride(0) if int4 else 0, out.stride(0),
        int4, group_size, bias is not None, precision)
    return out.reshape(*x.shape[:-1], cols)


def triton_int8_weight_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                              bias: torch.Tensor | None, prefill: str = "auto") -> torch.Tensor:
    """x [..., K] (fp16/bf16/fp32) times int8 qweight [N, K] with float32 scales [N], plus bias [N];
    ``prefill`` as in :func:`_dequantizes`."""
    from bevel.runtime.ops.int8_weight_linear import int8_weight_linear_reference

    _check_weight("int8_weight_linear", x, qweight, x.shape[-1])
    if not _kernel_takes(x, x.numel() // max(x.shape[-1], 1), qweight.shape[0]):
        return int8_weight_linear_reference(x, qweight, scale, bias)
    return _weight_only(x, qweight, scale, None, 0, bias, prefill)


def triton_int4_weight_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                              group_size: int, bias: torch.Tensor | None, prefill: str = "auto") -> torch.Tensor:
    """x [..., K] times a 4-bit weight (uint8 [N, K // 2], scales float16 [N, K // group_size], packed
    zero points uint8 [N, ceil(groups / 2)]), plus bias [N]; ``prefill`` as in :func:`_dequantizes`."""
    from bevel.runtime.ops.int4_weight_linear import int4_weight_linear_reference

    _check_weight("int4_weight_linear", x, qweight, (x.shape[-1] + 1) // 2)
    if (not _kernel_takes(x, x.numel() // max(x.shape[-1], 1), qweight.shape[0])
            or not weight_only_matmul.int4_group_size_supported(group_size) or x.shape[-1] % group_size):
        return int4_weight_linear_reference(x, qweight, scale, zero, group_size, bias)
    return _weight_only(x, qweight, scale, zero, group_size, bias, prefill)  # kernels read float16 scales


def triton_int8_dynamic_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                               bias: torch.Tensor | None, input_scale: torch.Tensor | None,
                               bits: int = 8) -> torch.Tensor:
    """W8A8: x [..., K] quantized per token to ``bits``-bit codes (after ``input_scale`` [K] if given)
    times int8 qweight [N, K] with float32 scales [N], plus bias [N]; integer sums, result in x's dtype."""
    from bevel.runtime.ops.int8_dynamic_linear import int8_dynamic_linear_reference

    _check_weight("int8_dynamic_linear", x, qweight, x.shape[-1])
    x2 = _as_rows(x)
    rows, k = x2.shape
    cols = qweight.shape[0]
    if not _kernel_takes(x, rows, cols):
        return int8_dynamic_linear_reference(x, qweight, scale, bias, input_scale, bits)
    half = 2 ** (bits - 1)
    qweight, scale = qweight.contiguous(), scale.contiguous()
    out = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
    bias_arg = bias.contiguous() if bias is not None else scale  # stand-ins are never read
    smooth = input_scale.contiguous() if input_scale is not None else scale
    if rows <= DECODE_MAX_ROWS:
        int8_matmul.decode_int8_matmul[_grid(rows, cols)](
            x2, smooth, scale, scale, qweight, scale, bias_arg, out,
            rows, cols, k, _m_bucket(rows), x2.stride(0), qweight.stride(0), out.stride(0),
            True, input_scale is not None, bias is not None, half)
    else:
        codes = torch.empty((rows, k), dtype=torch.int8, device=x.device)
        token_scale = torch.empty((rows,), dtype=torch.float32, device=x.device)
        zero = torch.empty((rows,), dtype=torch.float32, device=x.device)
        block_k = min(triton.next_power_of_2(k), 2048)
        int8_matmul.quantize_per_token_kernel[(rows,)](
            x2, smooth, codes, token_scale, zero, k, x2.stride(0), input_scale is not None, half, block_k,
            num_warps=8 if block_k >= 2048 else 4)
        int8_matmul.prefill_int8_matmul[_grid(rows, cols)](
            codes, scale, token_scale, zero, qweight, scale, bias_arg, out,
            rows, cols, k, _m_bucket(rows), codes.stride(0), qweight.stride(0), out.stride(0),
            False, False, bias is not None, half)
    return out.reshape(*x.shape[:-1], cols)
