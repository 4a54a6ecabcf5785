"""The CUDA faces of ``bevel::bipartite_match`` and ``bevel::merge_tokens`` (see
``runtime/ops/token_merge.py`` for what they mean).

Matching: one program per block of rows finds, for each token, its most similar real token of set B
(cosine), streaming over column blocks with a running maximum, so the [N, N] similarity matrix is
never written out; choosing the ``r`` best edges (``topk``) and numbering the kept tokens
(``cumsum``) are done on the [B, N] scores by torch. Merging: one program per (token, channel block)
adds the token times its size into its slot with atomic adds, then one pass divides by the slot's
size. Both kernels accumulate in float32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bevel.runtime.ops.token_merge import PADDING_SCORE, clamped_r


@triton.jit
def best_match_kernel(unit_ptr, size_ptr, best_ptr, where_ptr, N, C, protect,
                      BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr):
    """For rows i of batch b: the largest cosine to a real token of set B and its position.

    ``unit`` is [B, N, C] with unit rows (float32, contiguous); columns that are not real B tokens
    count as -inf, and where a row has none its position is 0.
    """
    b = tl.program_id(1)
    offs_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_c = tl.arange(0, BLOCK_C)
    base = unit_ptr + b.to(tl.int64) * N * C
    rows = tl.load(base + offs_i[:, None] * C + offs_c[None, :], mask=(offs_i[:, None] < N) & (offs_c[None, :] < C),
                   other=0.0)
    best = tl.full((BLOCK_I,), float("-inf"), tl.float32)
    where = tl.zeros((BLOCK_I,), tl.int32)
    for start in range(0, N, BLOCK_J):
        offs_j = start + tl.arange(0, BLOCK_J)
        cols = tl.load(base + offs_j[:, None] * C + offs_c[None, :],
                       mask=(offs_j[:, None] < N) & (offs_c[None, :] < C), other=0.0)
        sim = tl.dot(rows, tl.trans(cols), input_precision="ieee")  # [BLOCK_I, BLOCK_J]
        col_size = tl.load(size_ptr + b.to(tl.int64) * N + offs_j, mask=offs_j < N, other=0.0)
        is_b = (offs_j >= protect) & ((offs_j - protect) % 2 == 1) & (col_size > 0) & (offs_j < N)
        sim = tl.where(is_b[None, :], sim, float("-inf"))
        block_best = tl.max(sim, axis=1)
        block_where = tl.argmax(sim, axis=1).to(tl.int32) + start
        better = block_best > best  # strict: the first position wins a tie, as torch's max does
        where = tl.where(better, block_where, where)
        best = tl.where(better, block_best, best)
    out = b.to(tl.int64) * N + offs_i
    tl.store(best_ptr + out, best, mask=offs_i < N)
    tl.store(where_ptr + out, where.to(tl.int64), mask=offs_i < N)


def triton_bipartite_match(metric: torch.Tensor, size: torch.Tensor, r: int, protect: int) -> torch.Tensor:
    """``bevel::bipartite_match`` with the similarity search in Triton; same result as the reference
    up to float rounding of the cosines."""
    batch, count, channels = metric.shape
    remove = int(clamped_r(count, r, protect))
    slots = torch.arange(count, device=metric.device).expand(batch, count)
    if remove == 0:
        return slots.clone()
    unit = metric.float()
    unit = (unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-12)).contiguous()
    real = size > 0
    best = torch.empty(batch, count, device=metric.device, dtype=torch.float32)
    best_position = torch.empty(batch, count, device=metric.device, dtype=torch.int64)
    block_c = max(16, triton.next_power_of_2(channels))
    block = 32 if block_c <= 128 else 16
    best_match_kernel[(triton.cdiv(count, block), batch)](unit, size.float().contiguous(), best, best_position,
                                                          count, channels, protect, BLOCK_I=block, BLOCK_J=block,
                                                          BLOCK_C=block_c)
    position = torch.arange(count, device=metric.device)
    side_a = (position >= protect) & ((position - protect) % 2 == 0)
    score = torch.where(side_a & real, best, -torch.inf)
    score = torch.where((slots >= protect) & ~real, PADDING_SCORE + position.float(), score)
    removed = score.topk(remove, dim=1).indices
    kept = torch.ones(batch, count, dtype=torch.bool, device=metric.device).scatter(1, removed, False)
    prefix = kept.long().cumsum(dim=1) - 1
    return torch.where(kept | ~real, prefix.clamp_min(0), prefix.gather(1, best_position))


@triton.jit
def scatter_weighted_kernel(x_ptr, size_ptr, dest_ptr, sum_ptr, total_ptr, N, M, C,
                            BLOCK_C: tl.constexpr):
    """Token t of batch b adds x[b, t] * size[b, t] into sum[b, dest[b, t]] (and its size into total)."""
    row = tl.program_id(0).to(tl.int64)  # b * N + t
    b = row // N
    weight = tl.load(size_ptr + row)
    if weight != 0.0:
        slot = b * M + tl.load(dest_ptr + row)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        inside = offs_c < C
        x = tl.load(x_ptr + row * C + offs_c, mask=inside, other=0.0).to(tl.float32)
        tl.atomic_add(sum_ptr + slot * C + offs_c, x * weight, mask=inside)
        if tl.program_id(1) == 0:
            tl.atomic_add(total_ptr + slot, weight)


@triton.jit
def normalize_kernel(sum_ptr, total_ptr, out_ptr, C, BLOCK_C: tl.constexpr):
    """out[slot] = sum[slot] / total[slot] (zeros for a slot of padding only), in out's dtype."""
    slot = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = offs_c < C
    total = tl.maximum(tl.load(total_ptr + slot), 1.1754943508222875e-38)
    summed = tl.load(sum_ptr + slot * C + offs_c, mask=inside, other=0.0)
    tl.store(out_ptr + slot * C + offs_c, (summed / total).to(out_ptr.dtype.element_ty), mask=inside)


def triton_merge_tokens(x: torch.Tensor, size: torch.Tensor, dest: torch.Tensor,
                        slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``bevel::merge_tokens`` in two Triton kernels: a weighted scatter-add, then a divide."""
    batch, count, channels = x.shape
    x = x.contiguous()
    summed = torch.zeros(batch, slots, channels, device=x.device, dtype=torch.float32)
    total = torch.zeros(batch, slots, device=x.device, dtype=torch.float32)
    block_c = min(1024, triton.next_power_of_2(channels))
    channel_blocks = triton.cdiv(channels, block_c)
    scatter_weighted_kernel[(batch * count, channel_blocks)](x, size.float().contiguous(), dest.contiguous(),
                                                             summed, total, count, slots, channels,
                                                             BLOCK_C=block_c)
    out = torch.empty(batch, slots, channels, device=x.device, dtype=x.dtype)
    normalize_kernel[(batch * slots, channel_blocks)](summed, total, out, channels, BLOCK_C=block_c)
    return out, total

