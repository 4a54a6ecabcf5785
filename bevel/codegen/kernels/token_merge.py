"""The CUDA faces of ``bevel::bipartite_match`` and ``bevel::merge_tokens`` (see
``runtime/ops/token_merge.py`` for what they mean).

Matching, in two kernels whatever the batch: one program per block of rows finds, for each token,
its most similar real token of set B (cosine, the rows normalized in the kernel), streaming over
column blocks with a running maximum, so the [N, N] similarity matrix is never written out; then
one program per batch row turns those best matches into the plan: which A tokens go (the ``r``
best scores, ranked by counting, ties to the earlier token), the kept tokens numbered by a running
sum, and each removed token sent to its match's slot. (With torch ops for the normalizing, the
top-k and the numbering, one call launched about twenty kernels: 84 us per call on an H200 for a
ViT-B block at batch 64, against a few microseconds of matching.) Merging: one program per (token,
channel block) adds the token times its size into its slot with atomic adds, then one pass divides
by the slot's size. Both kernels accumulate in float32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bevel.runtime.ops.token_merge import PADDING_SCORE, clamped_r

_PADDING_SCORE = tl.constexpr(PADDING_SCORE)  # what a kernel may read of a module constant


@triton.jit
def best_match_kernel(metric_ptr, size_ptr, best_ptr, where_ptr, N, C, protect,
                      BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr):
    """For rows i of batch b: the largest cosine to a real token of set B and its position.

    ``metric`` is [B, N, C] (contiguous, any float dtype), compared in float32: the dot products
    over the channels in chunks of BLOCK_C (a whole row of a wide metric would not fit in shared
    memory), divided by both norms, each at least 1e-12 as in the reference; columns that are not
    real B tokens count as -inf, and where a row has none its position is 0.
    """
    b = tl.program_id(1)
    offs_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_c = tl.arange(0, BLOCK_C)
    base = metric_ptr + b.to(tl.int64) * N * C
    squares_i = tl.zeros((BLOCK_I,), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        rows = tl.load(base + offs_i[:, None] * C + c0 + offs_c[None, :],
                       mask=(offs_i[:, None] < N) & (c0 + offs_c[None, :] < C), other=0.0).to(tl.float32)
        squares_i += tl.sum(rows * rows, axis=1)
    norm_i = tl.maximum(tl.sqrt(squares_i), 1e-12)
    best = tl.full((BLOCK_I,), float("-inf"), tl.float32)
    where = tl.zeros((BLOCK_I,), tl.int32)
    for start in range(0, N, BLOCK_J):
        offs_j = start + tl.arange(0, BLOCK_J)
        dots = tl.zeros((BLOCK_I, BLOCK_J), tl.float32)
        squares_j = tl.zeros((BLOCK_J,), tl.float32)
        for c0 in range(0, C, BLOCK_C):
            rows = tl.load(base + offs_i[:, None] * C + c0 + offs_c[None, :],
                           mask=(offs_i[:, None] < N) & (c0 + offs_c[None, :] < C), other=0.0).to(tl.float32)
            cols = tl.load(base + offs_j[:, None] * C + c0 + offs_c[None, :],
                           mask=(offs_j[:, None] < N) & (c0 + offs_c[None, :] < C), other=0.0).to(tl.float32)
            dots += tl.dot(rows, tl.trans(cols), input_precision="ieee")
            squares_j += tl.sum(cols * cols, axis=1)
        sim = dots / norm_i[:, None] / tl.maximum(tl.sqrt(squares_j), 1e-12)[None, :]  # [BLOCK_I, BLOCK_J]
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


@triton.jit
def _removal_score(best_ptr, size_ptr, row, offs, N, protect):
    """Each token's claim to be removed (as the reference's ``score``): its best cosine for a real A
    token, above every cosine for padding (later padding first), -inf for the rest."""
    inside = offs < N
    real = tl.load(size_ptr + row + offs, mask=inside, other=0.0) > 0
    best = tl.load(best_ptr + row + offs, mask=inside, other=float("-inf"))
    side_a = (offs >= protect) & ((offs - protect) % 2 == 0)
    score = tl.where(side_a & real, best, float("-inf"))
    return tl.where((offs >= protect) & ~real & inside, _PADDING_SCORE + offs.to(tl.float32), score)


@triton.jit
def plan_kernel(best_ptr, where_ptr, size_ptr, prefix_ptr, dest_ptr, N, protect, remove, BLOCK: tl.constexpr):
    """The plan of batch row b from the best matches: ``dest`` [B, N] (see the reference).

    First each token's rank among the removal scores (how many score higher, or as high and come
    first) decides whether it goes (rank < ``remove``), and the kept tokens' running count is
    written to ``prefix``; then, once every thread of the program has written its part, each token
    reads its slot: its own for kept tokens and padding, its match's for removed ones.
    """
    row = tl.program_id(0).to(tl.int64) * N
    kept_before = 0
    for start in range(0, N, BLOCK):
        offs_i = start + tl.arange(0, BLOCK)
        score_i = _removal_score(best_ptr, size_ptr, row, offs_i, N, protect)
        rank = tl.zeros((BLOCK,), tl.int32)
        for other in range(0, N, BLOCK):
            offs_j = other + tl.arange(0, BLOCK)
            score_j = _removal_score(best_ptr, size_ptr, row, offs_j, N, protect)
            ahead = (score_j[None, :] > score_i[:, None]) | ((score_j[None, :] == score_i[:, None])
                                                             & (offs_j[None, :] < offs_i[:, None]))
            rank += tl.sum(ahead.to(tl.int32), axis=1)
        kept = ((rank >= remove) & (offs_i < N)).to(tl.int32)
        tl.store(prefix_ptr + row + offs_i, (kept_before + tl.cumsum(kept, axis=0) - 1).to(tl.int64), mask=offs_i < N)
        kept_before += tl.sum(kept, axis=0)
    tl.debug_barrier()  # the prefix of every token written before any is read
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < N
        prefix = tl.load(prefix_ptr + row + offs, mask=inside, other=0)
        kept = prefix > tl.load(prefix_ptr + row + offs - 1, mask=inside & (offs > 0), other=-1)
        stays = kept | (tl.load(size_ptr + row + offs, mask=inside, other=0.0) <= 0)
        match = tl.load(where_ptr + row + offs, mask=inside & ~stays, other=0)
        moved = tl.load(prefix_ptr + row + match, mask=inside & ~stays, other=0)
        tl.store(dest_ptr + row + offs, tl.where(stays, tl.maximum(prefix, 0), moved), mask=inside)


def triton_bipartite_match(metric: torch.Tensor, size: torch.Tensor, r: int, protect: int) -> torch.Tensor:
    """``bevel::bipartite_match`` in two Triton kernels; same result as the reference up to float
    rounding of the cosines (and, among equal scores, the earlier token goes first)."""
    batch, count, channels = metric.shape
    remove = int(clamped_r(count, r, protect))
    if remove == 0:
        return torch.arange(count, device=metric.device).expand(batch, count).clone()
    metric, size = metric.contiguous(), size.float().contiguous()
    best = torch.empty(batch, count, device=metric.device, dtype=torch.float32)
    best_position = torch.empty(batch, count, device=metric.device, dtype=torch.int64)
    block_c = min(64, max(16, triton.next_power_of_2(channels)))
    best_match_kernel[(triton.cdiv(count, 32), batch)](metric, size, best, best_position, count, channels, protect,
                                                       BLOCK_I=32, BLOCK_J=32, BLOCK_C=block_c)
    prefix = torch.empty(batch, count, device=metric.device, dtype=torch.int64)
    dest = torch.empty(batch, count, device=metric.device, dtype=torch.int64)
    plan_kernel[(batch,)](best, best_position, size, prefix, dest, count, protect, remove, BLOCK=64)
    return dest


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

