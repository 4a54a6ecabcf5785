"""The weight-only linears' kernel for a single row (M = 1, a decode step of one sequence): a
matrix-vector product, bound by reading the weight.

With one row, reading the weight is the whole cost, so this kernel does no matrix-unit work: the
decode kernel's ``tl.dot`` needs 16-row tiles, and its int4 tiles must lie inside one group (64
bytes of a row per step); at M = 1 on an H200 its best configs ran at 1.12-1.30x (int8) and
0.60-0.77x (int4) of bf16 ``F.linear``, this kernel's at 1.47-1.64x and 1.27-1.34x
(benchmarks/RESULTS.md). Each
program owns BLOCK_N output rows, streams their codes in tiles of BLOCK_K columns (whole groups for
int4: BLOCK_K a multiple of the group size) and reduces in float32 on the CUDA cores.

int4: with codes q, zero point z and scale s per group, ``sum_k (q_k - z) s x_k`` is computed as
``s * (sum_k q_k x_k - z * sum_k x_k)``: per byte two multiply-adds on the nibbles, the zero point
and scale once per group. x is read as column pairs and split into its even and odd columns, so
the packed bytes need no reordering.

Triton software-pipelines the loads of a loop by itself only when they feed ``tl.dot``; this loop
has none, so without more each program waits for every tile it loads before asking for the next.
``LOOP_STAGES`` > 1 annotates the loop (``tl.range(..., num_stages=...)``) so that the loads of the
next tiles are in flight while one is reduced: compiled for sm_90 (Triton 3.8, 16-byte aligned
pointers as a launch specializes them) the int8 and int4 loops then copy their tiles with
``cp.async`` into 3 buffers (24 KB and 16 KB of shared memory at 4 x 2048) instead of waiting on
``ld.global``. The configs with 3 and 4 stages are measured against the unpipelined ones by the
autotuner; on a GPU they are not measured yet.
"""

from __future__ import annotations

import triton
import triton.language as tl

from bevel.codegen.kernels.autotune import TunedKernel, cold_cache_bench, with_block_k


@triton.jit
def gemv_kernel(x_ptr, w_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_zn,
                INT4: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, LOOP_STAGES: tl.constexpr):
    """out[N] = dequant(w)[N, K] @ x[K] (+ bias); x contiguous, w with unit stride along K."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (offs_n % N).to(tl.int64)  # rows past the edge re-read valid ones, dropped at the store
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if INT4:
        TILE_GROUPS: tl.constexpr = BLOCK_K // GROUP_SIZE
        HALF: tl.constexpr = GROUP_SIZE // 2
        groups = K // GROUP_SIZE
        offs_g = tl.arange(0, TILE_GROUPS)
        offs_h = tl.arange(0, HALF)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=LOOP_STAGES):
            group = k0 // GROUP_SIZE + offs_g  # [G]
            in_group = group < groups
            byte = group[:, None] * HALF + offs_h[None, :]  # [G, HALF]: byte j holds columns 2j and 2j + 1
            # x as [G, HALF, 2] column pairs (contiguous loads), split into the even and odd columns
            pairs = tl.load(x_ptr + 2 * byte[:, :, None] + tl.arange(0, 2)[None, None, :],
                            mask=in_group[:, None, None], other=0.0).to(tl.float32)
            x_even, x_odd = tl.split(pairs)
            packed = tl.load(w_ptr + rows[:, None, None] * stride_wn + byte[None, :, :],
                             mask=in_group[None, :, None], other=0).to(tl.int32)  # [BLOCK_N, G, HALF]
            codes_x = tl.sum((packed & 0xF).to(tl.float32) * x_even[None, :, :]
                             + (packed >> 4).to(tl.float32) * x_odd[None, :, :], axis=2)  # [BLOCK_N, G]
            x_sum = tl.sum(x_even + x_odd, axis=1)  # [G]
            scale = tl.load(scale_ptr + rows[:, None] * stride_sn + group[None, :], mask=in_group[None, :],
                            other=0.0).to(tl.float32)
            zero_byte = tl.load(zero_ptr + rows[:, None] * stride_zn + group[None, :] // 2, mask=in_group[None, :],
                                other=0).to(tl.int32)
            zero = ((zero_byte >> ((group[None, :] % 2) * 4)) & 0xF).to(tl.float32)
            acc += tl.sum((codes_x - zero * x_sum[None, :]) * scale, axis=1)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=LOOP_STAGES):
            cols = k0 + offs_k
            in_k = cols < K
            x = tl.load(x_ptr + cols, mask=in_k, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=in_k[None, :], other=0)
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        acc = acc * tl.load(scale_ptr + rows).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows).to(tl.float32)
    tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty), mask=offs_n < N)


def _config(block_n: int, block_k: int, warps: int, loop_stages: int = 1) -> triton.Config:
    return triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k, "LOOP_STAGES": loop_stages}, num_warps=warps,
                         num_stages=2)


# The first is what the interpreter runs: small, so test shapes span several tiles both ways.
GEMV_CONFIGS = [
    _config(16, 128, 4),
    _config(2, 4096, 4),
    _config(4, 2048, 4),
    _config(4, 4096, 8),
    _config(8, 1024, 4),
    _config(8, 2048, 8),
    _config(16, 512, 4),
    _config(16, 1024, 8),
    _config(32, 256, 4),
    _config(32, 512, 8),
    _config(1, 4096, 4),
    _config(2, 2048, 4),
    _config(2, 4096, 8),
    _config(4, 2048, 8),
    _config(8, 1024, 8),
    _config(16, 2048, 8),
    _config(32, 1024, 8),
    # the loads of the next tiles issued while this one is reduced (see the module docstring)
    *(_config(n, k, warps, stages) for stages in (3, 4) for n, k, warps in
      ((2, 4096, 4), (4, 2048, 4), (8, 1024, 4), (16, 512, 4), (4, 4096, 8), (8, 2048, 8), (16, 1024, 8))),
]


def group_size_supported(group_size: int) -> bool:
    """Whether the kernel takes int4 groups of this size: a power of two of at least 32 columns."""
    return group_size >= 32 and group_size & (group_size - 1) == 0


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """int4 tiles hold whole groups: BLOCK_K raised to the group size where smaller."""
    args = {**named_args, **kwargs}
    if not args["INT4"]:
        return configs
    return with_block_k(configs, lambda block_k: max(block_k, args["GROUP_SIZE"]))


# ranked with the weights in DRAM, as in a model (in L2, other configs win)
gemv = TunedKernel(gemv_kernel, GEMV_CONFIGS, ["N", "K", "INT4", "GROUP_SIZE", "HAS_BIAS"], _prune, cold_cache_bench)
