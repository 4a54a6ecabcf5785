"""The W8A8 kernels of ``bevel::int8_dynamic_linear``: per-token int8 codes, then an int8 x int8 GEMM.

Codes follow ``quant_format.quantize_per_token`` bit for bit: ``x' = x * input_scale``, the token's
scale and zero point from its min and max, and the divisions in float32 with IEEE rounding
(``div_rn``: Triton's ``/`` is approximate on NVIDIA GPUs, and a code one off near a .5 boundary
would change the result by a whole weight step), rounding half to even. The int32 sums of the GEMM
are exact, and so is the zero point's share taken off them (``zero * row sum of w``, the row sums
accumulated from the weight tiles the GEMM loads anyway); the epilogue scales them like the reference,
``sums * token_scale * weight_scale + bias``, so results agree up to FMA contraction in that last step.

Prefill (M > 16) quantizes in its own kernel, so the GEMM reads one byte per activation. Decode
fuses the two: each program finds its (at most 16) rows' scales in a first pass over x and
quantizes tiles as it streams them, one launch instead of two; the rows, read once per N tile,
are small beside the weight.
"""

from __future__ import annotations

import triton
import triton.language as tl

from bevel.codegen.kernels.autotune import TunedKernel, configs_fitting_device, matmul_config
from bevel.runtime.ops import quant_format

# kernels may read only constexpr globals
_TOKEN_SCALE_EPS = tl.constexpr(quant_format.TOKEN_SCALE_EPS)
# 1.5 * 2**23: adding then subtracting it leaves a float32 rounded half to even to an integer when
# |v| < 2**22. Written out rather than libdevice's rint, whose module moved between Triton versions,
# so the interpreter runs the very arithmetic a GPU does.
_ROUNDING_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _smoothed_tile(x_ptrs, input_scale_ptr, offs_k, in_k, HAS_INPUT_SCALE: tl.constexpr):
    """A [rows, BLOCK_K] tile of x' = x * input_scale in float32, zero past K."""
    v = tl.load(x_ptrs, mask=in_k[None, :], other=0.0).to(tl.float32)
    if HAS_INPUT_SCALE:
        v = v * tl.load(input_scale_ptr + offs_k, mask=in_k, other=0.0).to(tl.float32)[None, :]
    return v


@triton.jit
def _round(v):
    """float32 v rounded half to even, for |v| < 2**22."""
    return (v + _ROUNDING_MAGIC) - _ROUNDING_MAGIC


@triton.jit
def _token_scale_and_zero(high, low, HALF: tl.constexpr):
    """A token's scale and zero point (float32 integer) from max(x, 0) and min(x, 0), for codes in
    [-HALF, HALF - 1] (HALF = 2 ** (bits - 1))."""
    token_scale = tl.math.div_rn(tl.maximum(high - low, _TOKEN_SCALE_EPS), 2.0 * HALF - 1.0)
    return token_scale, _round(tl.math.div_rn(-low, token_scale)) - HALF


@triton.jit
def _codes(v, token_scale, zero, HALF: tl.constexpr):
    """clamp(round_half_even(v / token_scale + zero), -HALF, HALF - 1) as int8; token_scale and zero
    broadcast over v."""
    v, token_scale = tl.broadcast(v, token_scale)
    q = tl.math.div_rn(v, token_scale) + zero
    return _round(tl.minimum(tl.maximum(q, -1.0 * HALF), HALF - 1.0)).to(tl.int8)


@triton.jit
def _range_of_rows(x_ptrs, input_scale_ptr, offs_k, K, HAS_INPUT_SCALE: tl.constexpr, BLOCK_K: tl.constexpr,
                   ROWS: tl.constexpr):
    """max(x', 0) and min(x', 0) of each of ROWS rows, in one pass over K."""
    high = tl.zeros((ROWS,), dtype=tl.float32)
    low = tl.zeros((ROWS,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        in_k = offs_k < K - k0
        v = _smoothed_tile(x_ptrs + k0, input_scale_ptr + k0, offs_k, in_k, HAS_INPUT_SCALE)
        high = tl.maximum(high, tl.max(v, axis=1))  # past K the tile reads 0, inside the range anyway
        low = tl.minimum(low, tl.min(v, axis=1))
    return high, low


@triton.jit
def quantize_per_token_kernel(x_ptr, input_scale_ptr, codes_ptr, token_scale_ptr, zero_ptr, K, stride_xm,
                              HAS_INPUT_SCALE: tl.constexpr, HALF: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per row: its scale and zero point in a first pass over K, its int8 codes in a second."""
    row = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_xm + offs_k[None, :]
    high, low = _range_of_rows(x_row, input_scale_ptr, offs_k, K, HAS_INPUT_SCALE, BLOCK_K, 1)
    token_scale, zero = _token_scale_and_zero(high, low, HALF)
    for k0 in range(0, K, BLOCK_K):
        in_k = offs_k + k0 < K
        v = _smoothed_tile(x_row + k0, input_scale_ptr + k0, offs_k, in_k, HAS_INPUT_SCALE)
        codes = _codes(v, token_scale[:, None], zero[:, None], HALF)
        tl.store(codes_ptr + row * K + k0 + offs_k[None, :], codes, mask=in_k[None, :])
    tl.store(token_scale_ptr + row + tl.arange(0, 1), token_scale)
    tl.store(zero_ptr + row + tl.arange(0, 1), zero)


@triton.jit
def int8_matmul_kernel(
        x_ptr, input_scale_ptr, token_scale_ptr, zero_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr,
        M, N, K, M_BUCKET, stride_xm, stride_wn, stride_om,
        QUANTIZE_X: tl.constexpr, HAS_INPUT_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HALF: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out = (codes @ w.T - zero * w.sum(1)) * token_scale * scale (+ bias). With QUANTIZE_X, x_ptr is
    the float input and the program makes its rows' codes itself; else x_ptr holds the int8 codes,
    token_scale_ptr and zero_ptr their scales and zero points. x and w have unit stride along K."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m % M  # past-the-edge rows and columns re-read valid ones; the store drops them
    cols = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_wn + offs_k[:, None]

    if QUANTIZE_X:
        high, low = _range_of_rows(x_ptrs, input_scale_ptr, offs_k, K, HAS_INPUT_SCALE, BLOCK_K, BLOCK_M)
        token_scale, zero = _token_scale_and_zero(high, low, HALF)
    else:
        token_scale = tl.load(token_scale_ptr + rows)
        zero = tl.load(zero_ptr + rows)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    row_sums = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        in_k = offs_k < K - k0
        if QUANTIZE_X:
            v = _smoothed_tile(x_ptrs, input_scale_ptr + k0, offs_k, in_k, HAS_INPUT_SCALE)
            # codes past K multiply weights masked to 0
            xq = _codes(v, token_scale[:, None], zero[:, None], HALF)
        else:
            xq = tl.load(x_ptrs, mask=in_k[None, :], other=0)
        w = tl.load(w_ptrs, mask=in_k[:, None], other=0)
        acc = tl.dot(xq, w, acc, out_dtype=tl.int32)  # Triton 3.6 checks acc against out_dtype
        row_sums += tl.sum(w.to(tl.int32), axis=0)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    acc -= zero.to(tl.int32)[:, None] * row_sums[None, :]
    out = acc.to(tl.float32) * token_scale[:, None] * tl.load(scale_ptr + cols).to(tl.float32)[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# first of each list: what the interpreter runs (see weight_only_matmul)
DECODE_CONFIGS = [
    matmul_config(16, 32, 128, 4, 4, group_m=1),
    matmul_config(16, 16, 256, 4, 4, group_m=1),
    matmul_config(16, 32, 256, 4, 4, group_m=1),
    matmul_config(16, 64, 128, 4, 4, group_m=1),
    matmul_config(16, 64, 256, 8, 3, group_m=1),
    matmul_config(16, 128, 128, 4, 4, group_m=1),
]
PREFILL_CONFIGS = [
    matmul_config(64, 64, 128, 4, 4),
    matmul_config(128, 128, 64, 8, 3),
    matmul_config(128, 256, 128, 8, 3),
    matmul_config(256, 128, 128, 8, 3),
    matmul_config(128, 128, 128, 8, 4),
    matmul_config(64, 128, 128, 4, 4),
    matmul_config(128, 64, 128, 4, 4),
]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    args = {**named_args, **kwargs}
    x = args["x_ptr"]
    # decode tiles stage the float input, prefill ones the int8 codes
    act_bytes = x.element_size()
    return configs_fitting_device(configs, x, act_bytes, 1.0)


_KEY = ["M_BUCKET", "N", "K", "QUANTIZE_X", "HAS_INPUT_SCALE", "HAS_BIAS"]
decode_int8_matmul = TunedKernel(int8_matmul_kernel, DECODE_CONFIGS, _KEY, _prune)
prefill_int8_matmul = TunedKernel(int8_matmul_kernel, PREFILL_CONFIGS, _KEY, _prune)
