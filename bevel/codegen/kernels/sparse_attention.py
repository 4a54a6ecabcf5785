"""The CUDA face of ``bevel::sparse_attention``: a block-sparse flash-attention forward (see
``runtime/ops/sparse_attention.py`` for what it computes).

One program per (query block, batch x query head) walks the key blocks its row of the block index
table lists, with the online softmax of FlashAttention: a running maximum and sum per query, the
accumulator rescaled when the maximum grows. Inside a listed block the position rule masks single
keys (causality, the head's window and sinks, empty slots), so a table may list more than is seen;
a key block whose positions every query of the block sees in full (an interior block of a window:
filled slots, none after the first query, all within the window of the last) skips that rule, as
FlexAttention's full blocks do, and scores are kept in base 2 for ``exp2`` (both not yet timed on a
GPU against the figures in benchmarks/RESULTS.md). Query and key blocks have the table's ``block``
size; grouped-query attention reads each KV head where its query heads need it, without copies.
When every head has the same window and sinks over the same slots, the table built from positions
has one head for all (32x less to build at 32 heads: building it per head cost more than the kernel
at 4K tokens on an H200).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bevel.runtime.ops.sparse_attention import head_values, kv_head_positions, positional_blocks


@triton.jit
def block_sparse_attention_kernel(q_ptr, k_ptr, v_ptr, q_pos_ptr, kv_pos_ptr, table_ptr, count_ptr, window_ptr,
                                  sinks_ptr, out_ptr, T, L, D, DV, HEADS, KV_HEADS, POS_HEADS, TABLE_HEADS,
                                  QUERY_BLOCKS, WIDTH, scale, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                                  BLOCK_DV: tl.constexpr, IEEE: tl.constexpr):
    """out[b, h, query block] from the key blocks table[b, h, query block, :count] (contiguous inputs;
    a table of one head serves every head)."""
    query_block = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // HEADS, bh % HEADS
    kv_head = h // (HEADS // KV_HEADS)
    pos_head = kv_head if POS_HEADS > 1 else 0
    offs_m = query_block * BLOCK + tl.arange(0, BLOCK)
    offs_d, offs_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    valid = offs_m < T
    q = tl.load(q_ptr + (bh * T + offs_m[:, None]) * D + offs_d[None, :],
                mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)
    q_pos = tl.load(q_pos_ptr + b * T + offs_m, mask=valid, other=0)
    window = tl.load(window_ptr + h)
    sinks = tl.load(sinks_ptr + h)
    top = tl.full((BLOCK,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK,), tl.float32)
    acc = tl.zeros((BLOCK, BLOCK_DV), tl.float32)
    # scores in base 2: exp2 of scaled scores is the exp of the plain ones, one multiply fewer each
    qk_scale = scale * 1.4426950408889634
    # the query block's position range: a key block inside it for every query needs no mask
    q_lo = tl.min(tl.where(valid, q_pos, 1 << 62))
    q_hi = tl.max(tl.where(valid, q_pos, -1))
    row = (b * TABLE_HEADS + (h if TABLE_HEADS > 1 else 0)) * QUERY_BLOCKS + query_block
    count = tl.load(count_ptr + row)
    kv_base = (b * KV_HEADS + kv_head) * L
    for i in range(0, count):
        key_block = tl.load(table_ptr + row * WIDTH + i)
        offs_n = key_block * BLOCK + tl.arange(0, BLOCK)
        inside = offs_n < L
        k = tl.load(k_ptr + (kv_base + offs_n[:, None]) * D + offs_d[None, :],
                    mask=inside[:, None] & (offs_d[None, :] < D), other=0.0)
        kv_pos = tl.load(kv_pos_ptr + (b * POS_HEADS + pos_head) * L + offs_n, mask=inside, other=-1)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale
        # every slot filled, none after the block's first query, all within the window of its last:
        # the interior blocks of a window, most of those it computes, skip the position rule
        k_lo, k_hi = tl.min(kv_pos), tl.max(kv_pos)
        full = (k_lo >= 0) & (k_hi <= q_lo) & ((window <= 0) | (q_hi - k_lo < window))
        if not full:
            distance = q_pos[:, None] - kv_pos[None, :]
            seen = (kv_pos[None, :] >= 0) & (distance >= 0) & (
                (window <= 0) | (distance < window) | (kv_pos[None, :] < sinks))
            s = tl.where(seen, s, float("-inf"))
        new_top = tl.maximum(top, tl.max(s, axis=1))
        shift = tl.where(new_top == float("-inf"), 0.0, new_top)  # no key seen yet: nothing to rescale
        p = tl.exp2(s - shift[:, None])
        alpha = tl.exp2(top - shift)
        total = total * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + (kv_base + offs_n[:, None]) * DV + offs_dv[None, :],
                    mask=inside[:, None] & (offs_dv[None, :] < DV), other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        top = new_top
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(out_ptr + (bh * T + offs_m[:, None]) * DV + offs_dv[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < T) & (offs_dv[None, :] < DV))


def triton_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor,
                            kv_positions: torch.Tensor, window: list[int], sinks: list[int],
                            block_index: torch.Tensor | None, block: int, scale: float,
                            num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """``bevel::sparse_attention`` with the kernel above; the block size must be a power of two of at
    least 16 (the tile of the kernel's matrix products). ``num_warps`` and ``num_stages`` are Triton's
    launch settings (default: 8 warps for blocks of 128 or more, else 4; Triton's stages)."""
    batch, heads, queries, dim = q.shape
    if block < 16 or block & (block - 1):
        raise ValueError(f"the Triton sparse attention needs a power-of-two block of at least 16, got {block}")
    if block_index is None:
        # one window and sink count for all heads over shared slots: one table serves every head
        shared = len(window) == 1 and len(sinks) == 1 and kv_head_positions(kv_positions).shape[1] == 1
        block_index = positional_blocks(q_positions, kv_positions, window, sinks, block, 1 if shared else heads)
    table = block_index.to(torch.int32).contiguous()
    counts = (block_index >= 0).sum(-1).to(torch.int32).contiguous()
    kv_pos = kv_head_positions(kv_positions).contiguous()
    out = torch.empty(batch, heads, queries, v.shape[-1], device=q.device, dtype=q.dtype)
    grid = (table.shape[2], batch * heads)
    block_sparse_attention_kernel[grid](
        q.contiguous(), k.contiguous(), v.contiguous(), q_positions.contiguous(), kv_pos, table, counts,
        head_values(window, heads, q.device), head_values(sinks, heads, q.device), out,
        queries, k.shape[2], dim, v.shape[-1], heads, k.shape[1], kv_pos.shape[1], table.shape[1], table.shape[2],
        table.shape[3],
        scale, BLOCK=block, BLOCK_D=max(16, triton.next_power_of_2(dim)),
        BLOCK_DV=max(16, triton.next_power_of_2(v.shape[-1])), IEEE=q.dtype == torch.float32,
        num_warps=num_warps or (8 if block >= 128 else 4), **({"num_stages": num_stages} if num_stages else {}))
    return out
