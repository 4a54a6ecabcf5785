"""The CUDA face of ``bevel::int8_embedding``: a Triton gather of int8 rows, scaled to float32.

Each program copies a block of BLOCK_ROWS looked-up rows by BLOCK_D columns: the indices once, the
int8 row slices and their scales, one multiply, a float32 store. It reads 1 byte per element
instead of 4, which is all the gain a memory-bound gather can have; no autotuning, the block is
sized from D. Negative indices count from the end, as ``qweight[indices]`` does in the reference.
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
def int8_embedding_kernel(w_ptr, scale_ptr, idx_ptr, out_ptr, L, V, D, stride_wv,
                          BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[l, d] = w[idx[l], d] * scale[idx[l]] for L indices; out is contiguous [L, D] float32."""
    offs_l = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_l = offs_l < L
    in_d = offs_d < D
    idx = tl.load(idx_ptr + offs_l, mask=in_l, other=0).to(tl.int64)
    idx = tl.where(idx < 0, idx + V, idx)
    valid = (idx >= 0) & (idx < V)
    tl.device_assert(valid | ~in_l, "int8_embedding: index out of range")
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
