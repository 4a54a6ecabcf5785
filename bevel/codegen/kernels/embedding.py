"""The CUDA faces of ``bevel::int8_embedding`` and ``bevel::int4_embedding``: Triton gathers of
quantized rows, dequantized to float32.

Each program copies a block of BLOCK_ROWS looked-up rows by BLOCK_D columns: the indices once, the
int8 row slices and their scales, one multiply, a float32 store. It reads 1 byte per element
instead of 4, which is all the gain a memory-bound gather can have; no autotuning, the block is
sized from D. The int4 kernel does the same on the group format of ``quant_format``: each column
reads its byte (D / 2 of them a row; two neighbouring columns share one, which the cache serves)
and its nibble, its group's scale and packed zero point, and computes ``(q - zero) * scale``; any
group size works, each column finding its group by division. Inputs outside the format it indexes
(other dtypes, tables narrower than their scales say) go to the plain torch reference.
Negative indices count from the end, as ``qweight[indices]`` does in the reference.
Indices out of range, which the reference rejects with an IndexError, cannot be raised from a GPU
without a synchronization: they trip a device assert when Triton's debug mode is on
(``TRITON_DEBUG=1``) and otherwise give rows of zeros, never a read outside the table.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# elements one program handles; enough to cover latency, small enough for many programs
_BLOCK_ELEMENTS = 4096
_MAX_BLOCK_D = 1024


@triton.jit
def _looked_up_rows(idx_ptr, L, V, D, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's tile: the table rows its indices name (negative ones counted from the end,
    as torch does), which of them are real lookups inside the table, and its columns."""
    offs_l = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_l = offs_l < L
    idx = tl.load(idx_ptr + offs_l, mask=in_l, other=0).to(tl.int64)
    idx = tl.where(idx < 0, idx + V, idx)
    valid = (idx >= 0) & (idx < V)
    tl.device_assert(valid | ~in_l, "embedding: index out of range")
    return offs_l, offs_d, in_l, offs_d < D, idx, valid


@triton.jit
def int8_embedding_kernel(w_ptr, scale_ptr, idx_ptr, out_ptr, L, V, D, stride_wv,
                          BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[l, d] = w[idx[l], d] * scale[idx[l]] for L indices; out is contiguous [L, D] float32."""
    offs_l, offs_d, in_l, in_d, idx, valid = _looked_up_rows(idx_ptr, L, V, D, BLOCK_ROWS, BLOCK_D)
    readable = in_l & valid
    codes = tl.load(w_ptr + idx[:, None] * stride_wv + offs_d[None, :], mask=readable[:, None] & in_d[None, :],
                    other=0)
    scale = tl.load(scale_ptr + idx, mask=readable, other=0.0)
    out = codes.to(tl.float32) * scale[:, None]
    tl.store(out_ptr + offs_l[:, None].to(tl.int64) * D + offs_d[None, :], out, mask=in_l[:, None] & in_d[None, :])


def triton_int8_embedding(qweight: torch.Tensor, scale: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows ``indices`` (any integer shape) of an int8 [V, D] table with float32 row scales [V], as
    float32 [*indices.shape, D]."""
    vocab, dim = qweight.shape
    flat = indices.reshape(-1)
    if flat.dtype not in (torch.int32, torch.int64):
        flat = flat.long()
    flat = flat.contiguous()
    qweight = qweight.contiguous() if qweight.stride(1) != 1 else qweight
    scale = scale.float().contiguous()
    out = torch.empty((flat.numel(), dim), dtype=torch.float32, device=qweight.device)
    if flat.numel() and dim:
        block_d = min(triton.next_power_of_2(dim), _MAX_BLOCK_D)
        block_rows = max(1, _BLOCK_ELEMENTS // block_d)
        grid = (triton.cdiv(flat.numel(), block_rows), triton.cdiv(dim, block_d))
        int8_embedding_kernel[grid](qweight, scale, flat, out, flat.numel(), vocab, dim, qweight.stride(0),
                                    block_rows, block_d, num_warps=4)
    return out.reshape(*indices.shape, dim)


@triton.jit
def int4_embedding_kernel(w_ptr, scale_ptr, zero_ptr, idx_ptr, out_ptr, L, V, D,
                          stride_wv, stride_sv, stride_zv,
                          GROUP_SIZE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[l, d] = (q[idx[l], d] - zero[idx[l], d // GROUP_SIZE]) * scale[idx[l], d // GROUP_SIZE],
    the codes unpacked from nibbles (even column low); out is contiguous [L, D] float32."""
    offs_l, offs_d, in_l, in_d, idx, valid = _looked_up_rows(idx_ptr, L, V, D, BLOCK_ROWS, BLOCK_D)
    mask = (in_l & valid)[:, None] & in_d[None, :]
    # GROUP_SIZE is a constexpr so this division is a shift for the power-of-two sizes in use
    group = offs_d // GROUP_SIZE
    packed = tl.load(w_ptr + idx[:, None] * stride_wv + (offs_d // 2)[None, :], mask=mask, other=0)
    q = (packed.to(tl.int32) >> ((offs_d % 2) * 4)[None, :]) & 0xF
    zpacked = tl.load(zero_ptr + idx[:, None] * stride_zv + (group // 2)[None, :], mask=mask, other=0)
    z = (zpacked.to(tl.int32) >> ((group % 2) * 4)[None, :]) & 0xF
    scale = tl.load(scale_ptr + idx[:, None] * stride_sv + group[None, :], mask=mask, other=0.0)
    # a difference of small integers is exact in int32 and in float32 alike; then one rounding,
    # the multiply, as in the reference (q * s - z * s would round twice)
    out = (q - z).to(tl.float32) * scale
    tl.store(out_ptr + offs_l[:, None].to(tl.int64) * D + offs_d[None, :], out, mask=in_l[:, None] & in_d[None, :])


def _int4_kernel_takes(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                       indices: torch.Tensor) -> bool:
    """Whether the inputs are the well-formed int4 group format the kernel indexes; anything else
    (other dtypes, tables too narrow for their scales) is left to the reference, which either
    handles it or raises the error a user should see."""
    if qweight.dtype != torch.uint8 or zero.dtype != torch.uint8 or not scale.is_floating_point():
        return False
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        return False
    if qweight.dim() != 2 or scale.dim() != 2 or zero.dim() != 2 or group_size <= 0:
        return False
    vocab, groups = scale.shape
    return (qweight.shape[0] == vocab and zero.shape[0] == vocab
            and 2 * qweight.shape[1] >= groups * group_size and 2 * zero.shape[1] >= groups)


def triton_int4_embedding(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                          indices: torch.Tensor) -> torch.Tensor:
    """Rows ``indices`` (any integer shape) of a 4-bit [V, D] table (uint8 qweight [V, D // 2], float32
    scales [V, D // group_size], packed zero points uint8 [V, ceil(groups / 2)]), as float32
    [*indices.shape, D]."""
    if not _int4_kernel_takes(qweight, scale, zero, group_size, indices):
        from bevel.runtime.ops.int4_embedding import int4_embedding_reference

        return int4_embedding_reference(qweight, scale, zero, group_size, indices)
    vocab, groups = scale.shape
    dim = groups * group_size
    flat = indices.reshape(-1)
    if flat.dtype not in (torch.int32, torch.int64):
        flat = flat.long()
    flat = flat.contiguous()
    # the kernel steps along a row by 1; the row strides it takes as arguments
    qweight = qweight.contiguous() if qweight.stride(1) != 1 else qweight
    zero = zero.contiguous() if zero.stride(1) != 1 else zero
    scale = scale.float()
    scale = scale.contiguous() if scale.stride(1) != 1 else scale
    out = torch.empty((flat.numel(), dim), dtype=torch.float32, device=qweight.device)
    if flat.numel() and dim:
        block_d = min(triton.next_power_of_2(dim), _MAX_BLOCK_D)
        block_rows = max(1, _BLOCK_ELEMENTS // block_d)
        grid = (triton.cdiv(flat.numel(), block_rows), triton.cdiv(dim, block_d))
        int4_embedding_kernel[grid](qweight, scale, zero, flat, out, flat.numel(), vocab, dim,
                                    qweight.stride(0), scale.stride(0), zero.stride(0),
                                    group_size, block_rows, block_d, num_warps=4)
    return out.reshape(*indices.shape, dim)
