"""Dequantizing a weight-only weight (int8 per channel, int4 in groups) to a 16-bit float weight in one
Triton pass, for long prefills.

At thousands of rows a linear is bound by arithmetic, not by reading its weight, and there cuBLAS's
16-bit GEMM beats the fused Triton GEMM that converts each weight tile in registers before
``tl.dot``: on an H200 at 4096 rows the fused kernel ran at 0.60x (int8) and 0.31x (int4) of bf16
``F.linear``, dequantizing then calling cuBLAS at 0.92x (benchmarks/RESULTS.md). So the weight-only
linears dequantize the weight once per call there (one read of the codes, one write of the 16-bit
weight) and call ``F.linear``. The values are those of the reference's float32 dequantization
rounded once to x's dtype."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 32
BLOCK_J = 128  # int8 columns of a row per program
INT4_TILE_COLUMNS = 256  # int4 columns of a row per program (whole groups; one group if larger)


@triton.jit
def dequantize_int8_kernel(q_ptr, scale_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
    """out[n, k] = q[n, k] * scale[n] (contiguous [N, K])."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    offsets = rows[:, None].to(tl.int64) * K + cols[None, :]
    q = tl.load(q_ptr + offsets, mask=mask, other=0).to(tl.float32)
    scale = tl.load(scale_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, (q * scale[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def dequantize_int4_kernel(q_ptr, scale_ptr, zero_ptr, out_ptr, N, K, GROUPS, ZERO_BYTES,
                           GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, TILE_GROUPS: tl.constexpr):
    """out[n, k] = (code(n, k) - zero(n, g)) * scale[n, g] for g = k // GROUP_SIZE, a [BLOCK_N rows,
    TILE_GROUPS groups] tile per program; byte j of a row holds columns 2j (low nibble) and 2j + 1."""
    HALF: tl.constexpr = GROUP_SIZE // 2
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    group = tl.program_id(1) * TILE_GROUPS + tl.arange(0, TILE_GROUPS)
    inside = (rows[:, None] < N) & (group[None, :] < GROUPS)  # [BLOCK_N, G]
    row_base = rows[:, None].to(tl.int64)
    byte = group[:, None] * HALF + tl.arange(0, HALF)[None, :]  # [G, HALF]
    packed = tl.load(q_ptr + row_base[:, :, None] * (K // 2) + byte[None, :, :], mask=inside[:, :, None],
                     other=0).to(tl.int32)
    scale = tl.load(scale_ptr + row_base * GROUPS + group[None, :], mask=inside, other=0.0).to(tl.float32)
    zero_byte = tl.load(zero_ptr + row_base * ZERO_BYTES + group[None, :] // 2, mask=inside, other=0).to(tl.int32)
    zero = (zero_byte >> ((group[None, :] % 2) * 4)) & 0xF
    low = ((packed & 0xF) - zero[:, :, None]).to(tl.float32) * scale[:, :, None]
    high = ((packed >> 4) - zero[:, :, None]).to(tl.float32) * scale[:, :, None]
    # [BLOCK_N, G, HALF, 2] -> columns g * GROUP_SIZE + 2j (low) and + 2j + 1 (high)
    values = tl.reshape(tl.join(low, high), (BLOCK_N, TILE_GROUPS * GROUP_SIZE))
    cols = tl.program_id(1) * TILE_GROUPS * GROUP_SIZE + tl.arange(0, TILE_GROUPS * GROUP_SIZE)
    tl.store(out_ptr + row_base * K + cols[None, :], values.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < N) & (cols[None, :] < K))


def int4_group_size_supported(group_size: int) -> bool:
    """Whether :func:`dequantize_int4` takes groups of this size: a power of two of at least 2."""
    return group_size >= 2 and group_size & (group_size - 1) == 0


def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The [N, K] weight of an int8 per-channel one, in ``dtype``."""
    n, k = qweight.shape
    out = torch.empty((n, k), dtype=dtype, device=qweight.device)
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(k, BLOCK_J))
    dequantize_int8_kernel[grid](qweight.contiguous(), scale.contiguous(), out, n, k, BLOCK_N, BLOCK_J)
    return out


def dequantize_int4(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """The [N, K] weight of a 4-bit group-quantized one (layout of ``quant_format``), in ``dtype``;
    ``group_size`` as :func:`int4_group_size_supported` takes."""
    n, groups = scale.shape
    k = groups * group_size
    out = torch.empty((n, k), dtype=dtype, device=qweight.device)
    tile_groups = max(1, INT4_TILE_COLUMNS // group_size)
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(groups, tile_groups))
    dequantize_int4_kernel[grid](qweight.contiguous(), scale.contiguous(), zero.contiguous(), out, n, k, groups,
                                 zero.shape[1], group_size, BLOCK_N, tile_groups)
    return out
