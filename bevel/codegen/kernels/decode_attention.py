"""The CUDA face of ``bevel::cache_attention`` (see ``runtime/ops/cache_attention.py``): attention of a
few queries over a long, possibly quantized KV cache.

A decode step has one query per sequence and head, too few programs to fill a GPU if each walked
the whole cache, so the slots are split into chunks ("flash decoding"). One program takes one KV
head's chunk for every query row that reads it: the query heads of its group (grouped-query
attention) times the step's queries, up to BLOCK_Q rows in one tile. So each key and value is read
once per KV head, not once per query head, and the products run on the matrix units (``tl.dot``):
keys and values are read as stored (float, int8, or two 4-bit codes per byte), dequantized in
registers with their group's scale (and low end) and rounded to the queries' dtype, as a 16-bit
attention rounds its softmax weights. Each program keeps a running maximum, sum and weighted value
sum per row; torch merges the chunks' partial results. The mass per slot, when asked for, is a
second pass that recomputes the scores with each row's final log-sum-exp and adds the column sums
into the slot's KV head.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bevel.runtime.ops.kv_quant import params_per_group
from bevel.runtime.ops.sparse_attention import head_values, kv_head_positions

BLOCK_N = 64
MAX_BLOCK_Q = 64  # query rows of one program at most (a prefill over the cache takes several tiles)
# programs a step should start at least (several per multiprocessor), reached by splitting the slots
TARGET_PROGRAMS = 1024


@triton.jit
def _load_cache(ptr, params_ptr, rows, offs_d, inside, D, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                PARAMS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Keys or values of the slots ``rows`` (global row numbers) as float32 [BLOCK_N, BLOCK_D].

    Codes are read as stored, contiguous along the row (4-bit: the packed bytes, split into their low
    and high nibbles and interleaved in registers). Where the tile holds whole groups, each group's
    scale (and low end) is read once per row and broadcast over its channels; reading it for every
    channel, as the fallback for other group sizes does, compiled to one scalar load per element.
    """
    mask = inside[:, None] & (offs_d[None, :] < D)
    if BITS == 0:
        return tl.load(ptr + rows[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    groups = D // GROUP_SIZE
    if BITS == 8:
        codes = tl.load(ptr + rows[:, None] * D + offs_d[None, :], mask=mask, other=0).to(tl.float32)
    else:
        offs_h = tl.arange(0, BLOCK_D // 2)  # byte j holds channels 2j (low nibble) and 2j + 1
        packed = tl.load(ptr + rows[:, None] * (D // 2) + offs_h[None, :],
                         mask=inside[:, None] & (offs_h[None, :] < D // 2), other=0).to(tl.int32)
        codes = tl.reshape(tl.join(packed & 15, (packed >> 4) & 15), (BLOCK_N, BLOCK_D)).to(tl.float32)
    if BLOCK_D % GROUP_SIZE == 0:
        TILE_GROUPS: tl.constexpr = BLOCK_D // GROUP_SIZE
        offs_g = tl.arange(0, TILE_GROUPS)
        group_mask = inside[:, None] & (offs_g[None, :] < groups)
        param = params_ptr + (rows[:, None] * groups + offs_g[None, :]) * PARAMS  # [BLOCK_N, TILE_GROUPS]
        values = tl.reshape(codes, (BLOCK_N, TILE_GROUPS, GROUP_SIZE)) * tl.load(param, mask=group_mask,
                                                                                  other=0.0)[:, :, None]
        if BITS == 4:
            values += tl.load(param + 1, mask=group_mask, other=0.0)[:, :, None]
        return tl.reshape(values, (BLOCK_N, BLOCK_D))
    param = params_ptr + (rows[:, None] * groups + offs_d[None, :] // GROUP_SIZE) * PARAMS
    values = codes * tl.load(param, mask=mask, other=0.0)
    if BITS == 4:
        values += tl.load(param + 1, mask=mask, other=0.0)
    return values


@triton.jit
def _query_rows(q_ptr, q_pos_ptr, window_ptr, sinks_ptr, b, kv_head, q_block, T, D, HEADS, KV_HEADS,
                BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """The tile's query rows (heads of the group x queries): their global row numbers
    ``(b * HEADS + h) * T + t``, validity, queries [BLOCK_Q, BLOCK_D], positions, windows and sinks."""
    group = HEADS // KV_HEADS
    r = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    valid = r < group * T
    r = tl.where(valid, r, 0)
    h = kv_head * group + r // T
    t = r % T
    row = (b * HEADS + h) * T + t
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + row[:, None] * D + offs_d[None, :], mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)
    q_pos = tl.load(q_pos_ptr + b * T + t)
    return row, valid, q, q_pos, tl.load(window_ptr + h), tl.load(sinks_ptr + h)


@triton.jit
def _scores(q, q_pos, window, sinks, k_ptr, kp_ptr, kv_pos_ptr, kv_base, pos_base, offs_n, stop, scale, D,
            BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, PARAMS: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    """Scores [BLOCK_Q, BLOCK_N] of the rows against the slots ``offs_n`` (-inf where not seen)."""
    inside = offs_n < stop
    k = _load_cache(k_ptr, kp_ptr, kv_base + offs_n, tl.arange(0, BLOCK_D), inside, D, BITS, GROUP_SIZE,
                    PARAMS, BLOCK_N, BLOCK_D).to(q.dtype)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * scale
    kv_pos = tl.load(kv_pos_ptr + pos_base + offs_n, mask=inside, other=-1)
    distance = q_pos[:, None] - kv_pos[None, :]
    seen = (kv_pos[None, :] >= 0) & (distance >= 0) & (
        (window[:, None] <= 0) | (distance < window[:, None]) | (kv_pos[None, :] < sinks[:, None]))
    return tl.where(seen, s, float("-inf")), inside


@triton.jit
def decode_attention_kernel(q_ptr, k_ptr, v_ptr, kp_ptr, vp_ptr, q_pos_ptr, kv_pos_ptr, window_ptr, sinks_ptr,
                            top_ptr, total_ptr, acc_ptr, T, L, D, HEADS, KV_HEADS, POS_HEADS, Q_BLOCKS, CHUNK,
                            SPLITS, scale, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, PARAMS: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
                            IEEE: tl.constexpr):
    """Partial softmax state of one tile of query rows over the slots of chunk ``split``."""
    pid = tl.program_id(0).to(tl.int64)  # (b * KV_HEADS + kv_head) * Q_BLOCKS + q_block
    split = tl.program_id(1)
    q_block = pid % Q_BLOCKS
    b, kv_head = (pid // Q_BLOCKS) // KV_HEADS, (pid // Q_BLOCKS) % KV_HEADS
    row, valid, q, q_pos, window, sinks = _query_rows(q_ptr, q_pos_ptr, window_ptr, sinks_ptr, b, kv_head, q_block,
                                                      T, D, HEADS, KV_HEADS, BLOCK_Q, BLOCK_D)
    kv_base = (b * KV_HEADS + kv_head) * L
    pos_base = (b * POS_HEADS + (kv_head if POS_HEADS > 1 else 0)) * L
    offs_d = tl.arange(0, BLOCK_D)
    start = split * CHUNK
    stop = tl.minimum(start + CHUNK, L)
    top = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_Q,), tl.float32)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), tl.float32)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s, inside = _scores(q, q_pos, window, sinks, k_ptr, kp_ptr, kv_pos_ptr, kv_base, pos_base, offs_n, stop,
                            scale, D, BITS, GROUP_SIZE, PARAMS, BLOCK_N, BLOCK_D, IEEE)
        new_top = tl.maximum(top, tl.max(s, axis=1))
        shift = tl.where(new_top == float("-inf"), 0.0, new_top)  # nothing seen yet: nothing to rescale
        p = tl.exp(s - shift[:, None])
        alpha = tl.exp(top - shift)
        total = total * alpha + tl.sum(p, axis=1)
        v = _load_cache(v_ptr, vp_ptr, kv_base + offs_n, offs_d, inside, D, BITS, GROUP_SIZE, PARAMS, BLOCK_N,
                        BLOCK_D).to(q.dtype)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v)
        top = new_top
    part = row * SPLITS + split
    tl.store(top_ptr + part, top, mask=valid)
    tl.store(total_ptr + part, total, mask=valid)
    tl.store(acc_ptr + part[:, None] * D + offs_d[None, :], acc, mask=valid[:, None] & (offs_d[None, :] < D))


@triton.jit
def slot_mass_kernel(q_ptr, k_ptr, kp_ptr, q_pos_ptr, kv_pos_ptr, window_ptr, sinks_ptr, lse_ptr, mass_ptr,
                     T, L, D, HEADS, KV_HEADS, POS_HEADS, Q_BLOCKS, CHUNK, scale, BITS: tl.constexpr,
                     GROUP_SIZE: tl.constexpr, PARAMS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_Q: tl.constexpr, IEEE: tl.constexpr):
    """Adds each slot's softmax weights from the tile's query rows into mass[b, kv head, slot]."""
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    q_block = pid % Q_BLOCKS
    b, kv_head = (pid // Q_BLOCKS) // KV_HEADS, (pid // Q_BLOCKS) % KV_HEADS
    row, valid, q, q_pos, window, sinks = _query_rows(q_ptr, q_pos_ptr, window_ptr, sinks_ptr, b, kv_head, q_block,
                                                      T, D, HEADS, KV_HEADS, BLOCK_Q, BLOCK_D)
    # rows outside the tile and rows that see nothing (log-sum-exp -inf) give no weight
    lse = tl.load(lse_ptr + row, mask=valid, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    kv_base = (b * KV_HEADS + kv_head) * L
    pos_base = (b * POS_HEADS + (kv_head if POS_HEADS > 1 else 0)) * L
    start = split * CHUNK
    stop = tl.minimum(start + CHUNK, L)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s, inside = _scores(q, q_pos, window, sinks, k_ptr, kp_ptr, kv_pos_ptr, kv_base, pos_base, offs_n, stop,
                            scale, D, BITS, GROUP_SIZE, PARAMS, BLOCK_N, BLOCK_D, IEEE)
        p = tl.where(s == float("-inf"), 0.0, tl.exp(s - lse[:, None]))
        tl.atomic_add(mass_ptr + kv_base + offs_n, tl.sum(p, axis=0), mask=inside)


def triton_cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_params: torch.Tensor | None,
                           v_params: torch.Tensor | None, q_positions: torch.Tensor, kv_positions: torch.Tensor,
                           window: list[int], sinks: list[int], scale: float, bits: int, group_size: int,
                           with_mass: bool, splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``bevel::cache_attention`` with the kernels above; ``splits`` chunks of slots (default: enough
    for TARGET_PROGRAMS programs, chunks of at least two blocks of slots)."""
    batch, heads, queries, dim = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    rows = batch * heads * queries
    group_rows = heads // kv_heads * queries  # query rows reading one KV head
    block_q = min(MAX_BLOCK_Q, max(16, triton.next_power_of_2(group_rows)))
    q_blocks = triton.cdiv(group_rows, block_q)
    tiles = batch * kv_heads * q_blocks
    if splits is None:
        splits = max(1, min(triton.cdiv(length, 2 * BLOCK_N), triton.cdiv(TARGET_PROGRAMS, tiles)))
    chunk = triton.cdiv(triton.cdiv(length, splits), BLOCK_N) * BLOCK_N
    splits = triton.cdiv(length, chunk)
    kv_pos = kv_head_positions(kv_positions).contiguous()
    q = q.contiguous()
    k, v = k.contiguous(), v.contiguous()
    k_params = k_params.contiguous() if k_params is not None else k
    v_params = v_params.contiguous() if v_params is not None else v
    window_t, sinks_t = head_values(window, heads, q.device), head_values(sinks, heads, q.device)
    # every (row, chunk) belongs to exactly one program, which writes it
    top = torch.empty(rows, splits, device=q.device, dtype=torch.float32)
    total = torch.empty_like(top)
    acc = torch.empty(rows, splits, dim, device=q.device, dtype=torch.float32)
    constants = dict(BITS=bits, GROUP_SIZE=group_size if bits else 1, PARAMS=params_per_group(bits) if bits else 1,
                     BLOCK_N=BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(dim)), BLOCK_Q=block_q,
                     IEEE=q.dtype == torch.float32)
    decode_attention_kernel[(tiles, splits)](q, k, v, k_params, v_params, q_positions.contiguous(), kv_pos, window_t,
                                             sinks_t, top, total, acc, queries, length, dim, heads, kv_heads,
                                             kv_pos.shape[1], q_blocks, chunk, splits, scale, **constants)
    best = top.amax(dim=1, keepdim=True)
    weight = torch.where(torch.isfinite(top), torch.exp(top - torch.where(torch.isfinite(best), best, 0.0)), 0.0)
    norm = (weight * total).sum(dim=1)
    out = (weight[..., None] * acc).sum(dim=1) / torch.where(norm > 0, norm, 1.0)[:, None]
    out = out.reshape(batch, heads, queries, dim).to(q.dtype)
    if not with_mass:
        return out, q.new_empty(0, dtype=torch.float32)
    lse = (best.squeeze(1) + torch.log(norm)).contiguous()  # -inf for a row that sees nothing: no mass
    mass = torch.zeros(batch, kv_heads, length, device=q.device, dtype=torch.float32)
    slot_mass_kernel[(tiles, splits)](q, k, k_params, q_positions.contiguous(), kv_pos, window_t, sinks_t, lse, mass,
                                      queries, length, dim, heads, kv_heads, kv_pos.shape[1], q_blocks, chunk, scale,
                                      **constants)
    return out, mass
