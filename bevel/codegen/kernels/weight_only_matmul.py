"""The fused dequantize-matmul kernel of the weight-only linears (int8 per channel, int4 in groups).

One kernel body, two autotuned shapes of it:

- decode (M <= 16): ``BLOCK_M = 16`` covers every row, so programs tile N only and each streams the
  whole of K for its BLOCK_N output columns; small BLOCK_N and long BLOCK_K keep enough programs
  and bytes in flight to be bound by reading the weight, which is the point of quantizing it;
- prefill (M > 16): the tiled GEMM of Triton's matmul tutorial, tiles ordered in groups of GROUP_M
  rows for L2 reuse.

The weight never exists in float in memory: each [BLOCK_K, BLOCK_N] tile is read as int8 (or packed
nibbles), turned into integers in the activation dtype in registers (exact: |q| <= 127 fits fp16
and bf16) and fed to ``tl.dot`` with float32 accumulation. Scales multiply the float32 sums, not
the weights: once in the epilogue for int8 (one scale per output column), once per K tile for int4,
whose tiles lie inside one group. int4 bytes hold columns 2j (low nibble) and 2j + 1 (high): the
two nibble planes are interleaved back into K order in registers (join, permute, reshape), so the
activations are read contiguously. Reading x as its even and odd columns instead, for two dots on
the planes, compiled for sm_90 to scalar 2-byte loads that the pipeliner could not make async.

Split-K is left out: it needs a float32 buffer, atomics and a cast afterwards (two more launches,
costly beside a decode GEMV of a few microseconds), and small BLOCK_N already gives LLM-sized N
enough programs.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from bevel.codegen.kernels.autotune import (
    TunedKernel,
    cold_cache_bench,
    configs_fitting_device,
    matmul_config,
    with_block_k,
)


@triton.jit
def _int8_weight_sums(x_ptr, w_ptr, rows, cols, K, stride_xm, stride_wn,
                      DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """sum_k x[m, k] * q[n, k] in float32 for one [BLOCK_M, BLOCK_N] tile (scales come later)."""
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        in_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=in_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=in_k[:, None], other=0)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def _int4_weight_sums(x_ptr, w_ptr, scale_ptr, zero_ptr, rows, cols, K, stride_xm, stride_wn, stride_sn,
                      stride_zn, GROUP_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """sum_k x[m, k] * w[n, k] in float32 for one tile, w = (q - zero) * scale by group; BLOCK_K
    divides GROUP_SIZE (so also K), hence no K mask and one scale and zero per column per tile."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, BLOCK_K // 2)  # byte j of the tile holds columns 2j and 2j + 1
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_wn + offs_j[:, None]
    scale_ptrs = scale_ptr + cols.to(tl.int64) * stride_sn
    zero_ptrs = zero_ptr + cols.to(tl.int64) * stride_zn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        group = k0 // GROUP_SIZE
        zero = (tl.load(zero_ptrs + group // 2).to(tl.int32) >> ((group % 2) * 4)) & 0xF
        scale = tl.load(scale_ptrs + group)
        x = tl.load(x_ptrs)
        packed = tl.load(w_ptrs).to(tl.int32)
        low = ((packed & 0xF) - zero[None, :]).to(x.dtype)
        high = ((packed >> 4) - zero[None, :]).to(x.dtype)
        # [BLOCK_K // 2, BLOCK_N, 2] -> [BLOCK_K // 2, 2, BLOCK_N] -> rows 2j (low), 2j + 1 (high)
        w = tl.reshape(tl.permute(tl.join(low, high), (0, 2, 1)), (BLOCK_K, BLOCK_N))
        acc += tl.dot(x, w, input_precision=DOT_PRECISION) * scale.to(tl.float32)[None, :]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K // 2
    return acc


@triton.jit
def weight_only_matmul_kernel(
        x_ptr, w_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr,
        M, N, K, M_BUCKET, stride_xm, stride_wn, stride_sn, stride_zn, stride_om,
        INT4: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out[M, N] = x[M, K] @ dequant(w).T (+ bias), in out's dtype; ``M_BUCKET`` only keys the
    autotuner. x and w have unit stride along K."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # GROUP_M row-tiles sweep the N tiles together, so their weight tiles are read from L2 mostly
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # rows and columns past the edge re-read valid ones (dropped at the store), so loads need no mask
    rows = offs_m % M
    cols = offs_n % N
    if INT4:
        acc = _int4_weight_sums(x_ptr, w_ptr, scale_ptr, zero_ptr, rows, cols, K, stride_xm, stride_wn,
                                stride_sn, stride_zn, GROUP_SIZE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        acc = _int8_weight_sums(x_ptr, w_ptr, rows, cols, K, stride_xm, stride_wn, DOT_PRECISION,
                                BLOCK_M, BLOCK_N, BLOCK_K)
        acc = acc * tl.load(scale_ptr + cols).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# The first of each list is the one the interpreter runs: mid-sized, so small test shapes still
# span several tiles.
DECODE_CONFIGS = [
    matmul_config(16, 32, 128, 4, 4, group_m=1),
    matmul_config(16, 16, 256, 4, 4, group_m=1),
    matmul_config(16, 32, 256, 4, 4, group_m=1),
    matmul_config(16, 64, 128, 4, 4, group_m=1),
    matmul_config(16, 64, 256, 8, 3, group_m=1),
    matmul_config(16, 16, 512, 4, 3, group_m=1),
    matmul_config(16, 128, 128, 4, 4, group_m=1),
    matmul_config(16, 32, 64, 2, 5, group_m=1),
    # more weight bytes in flight per program, for reading at the GPU's full memory bandwidth
    matmul_config(16, 32, 512, 4, 3, group_m=1),
    matmul_config(16, 64, 512, 8, 3, group_m=1),
    matmul_config(16, 128, 256, 8, 3, group_m=1),
]
PREFILL_CONFIGS = [
    matmul_config(64, 64, 64, 4, 4),
    matmul_config(128, 128, 64, 8, 3),
    matmul_config(128, 256, 64, 8, 3),
    matmul_config(256, 128, 64, 8, 3),
    matmul_config(128, 128, 32, 4, 4),
    matmul_config(64, 128, 64, 4, 4),
    matmul_config(128, 64, 64, 4, 4),
    matmul_config(64, 256, 64, 8, 4),
    matmul_config(128, 128, 128, 8, 3),
]
# int4 tiles must lie inside one group and hold at least 16 byte columns for tl.dot
MIN_INT4_BLOCK_K = 32


def int4_group_size_supported(group_size: int) -> bool:
    """Whether the kernel takes int4 weights with this group size (a multiple of MIN_INT4_BLOCK_K)."""
    return group_size % MIN_INT4_BLOCK_K == 0


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    args = {**named_args, **kwargs}
    x = args["x_ptr"]
    weight_bytes = 1.0
    if args["INT4"]:
        group_size = args["GROUP_SIZE"]
        # the largest power of two that divides both: a tile never straddles a group boundary
        configs = with_block_k(configs, lambda block_k: math.gcd(block_k, group_size))
        weight_bytes = 0.5
    # the weight tile is converted to x's dtype in registers, then staged once more for the dot
    return configs_fitting_device(configs, x, x.element_size(), weight_bytes, converted_bytes=x.element_size())


_KEY = ["M_BUCKET", "N", "K", "INT4", "GROUP_SIZE", "HAS_BIAS"]
decode_matmul = TunedKernel(weight_only_matmul_kernel, DECODE_CONFIGS, _KEY, _prune, cold_cache_bench)
prefill_matmul = TunedKernel(weight_only_matmul_kernel, PREFILL_CONFIGS, _KEY, _prune)
