"""The CUDA face of ``bevel::cache_attention`` (see ``runtime/ops/cache_attention.py``): attention of a
few queries over a long, possibly quantized KV cache.

A decode step has one query per sequence and head, too few programs to fill a GPU if each walked
the whole cache, so the slots are split into chunks ("flash decoding"): one program per (query row,
chunk) keeps a running maximum, sum and weighted value sum over its chunk, reading keys and values
as stored (float, int8, or two 4-bit codes per byte) and dequantizing them in registers with their
group's scale (and low end); torch then merges the chunks' partial results. The mass per slot, when
asked for, is a second pass that recomputes each score with the row's final log-sum-exp and adds
its weight into the slot's KV head (atomic adds: query heads of a group share a slot).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bevel.runtime.ops.kv_quant import params_per_group
from bevel.runtime.ops.sparse_attention import head_values, kv_head_positions

BLOCK_N = 64


@triton.jit
def _load_cache(ptr, params_ptr, rows, offs_d, inside, D, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                PARAMS: tl.constexpr):
    """Keys or values of the slots ``rows`` (global row numbers) as float32 [BLOCK_N, BLOCK_D]."""
    mask = inside[:, None] & (offs_d[None, :] < D)
    if BITS == 0:
        return tl.load(ptr + rows[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    groups = D // GROUP_SIZE
    param = params_ptr + (rows[:, None] * groups + offs_d[None, :] // GROUP_SIZE) * PARAMS
    scale = tl.load(param, mask=mask, other=0.0)
    if BITS == 8:
        codes = tl.load(ptr + rows[:, None] * D + offs_d[None, :], mask=mask, other=0).to(tl.float32)
        return codes * scale
    packed = tl.load(ptr + rows[:, None] * (D // 2) + offs_d[None, :] // 2, mask=mask, other=0).to(tl.int32)
    codes = ((packed >> ((offs_d[None, :] % 2) * 4)) & 15).to(tl.float32)
    low = tl.load(param + 1, mask=mask, other=0.0)
    return codes * scale + low


@triton.jit
def _scores(q, q_pos, k_ptr, kp_ptr, kv_pos_ptr, kv_base, pos_base, offs_n, offs_d, stop, window, sinks, scale, D,
            BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, PARAMS: tl.constexpr):
    """Scores [BLOCK_N] of one query against the slots ``offs_n`` (-inf where not seen)."""
    inside = offs_n < stop
    k = _load_cache(k_ptr, kp_ptr, kv_base + offs_n, offs_d, inside, D, BITS, GROUP_SIZE, PARAMS)
    s = tl.sum(q[None, :] * k, axis=1) * scale
    kv_pos = tl.load(kv_pos_ptr + pos_base + offs_n, mask=inside, other=-1)
    distance = q_pos - kv_pos
    seen = (kv_pos >= 0) & (distance >= 0) & ((window <= 0) | (distance < window) | (kv_pos < sinks))
    return tl.where(seen & inside, s, float("-inf")), inside


@triton.jit
def decode_attention_kernel(q_ptr, k_ptr, v_ptr, kp_ptr, vp_ptr, q_pos_ptr, kv_pos_ptr, window_ptr, sinks_ptr,
                            top_ptr, total_ptr, acc_ptr, T, L, D, HEADS, KV_HEADS, POS_HEADS, CHUNK, SPLITS, scale,
                            BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, PARAMS: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partial softmax state of query row ``row`` over the slots of chunk ``split``."""
    row = tl.program_id(0).to(tl.int64)  # (b * HEADS + h) * T + t
    split = tl.program_id(1)
    bh = row // T
    b, h = bh // HEADS, bh % HEADS
    kv_head = h // (HEADS // KV_HEADS)
    kv_base = (b * KV_HEADS + kv_head) * L
    pos_base = (b * POS_HEADS + (kv_head if POS_HEADS > 1 else 0)) * L
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + row * D + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
    q_pos = tl.load(q_pos_ptr + b * T + row % T)
    window = tl.load(window_ptr + h)
    sinks = tl.load(sinks_ptr + h)
    start = split * CHUNK
    stop = tl.minimum(start + CHUNK, L)
    top = tl.full((1,), float("-inf"), tl.float32)
    total = tl.zeros((1,), tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s, inside = _scores(q, q_pos, k_ptr, kp_ptr, kv_pos_ptr, kv_base, pos_base, offs_n, offs_d, stop, window,
                            sinks, scale, D, BITS, GROUP_SIZE, PARAMS)
        new_top = tl.maximum(top, tl.max(s, axis=0))
        shift = tl.where(new_top == float("-inf"), 0.0, new_top)
        p = tl.exp(s - shift)
        alpha = tl.exp(top - shift)
        v = _load_cache(v_ptr, vp_ptr, kv_base + offs_n, offs_d, inside, D, BITS, GROUP_SIZE, PARAMS)
        total = total * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        top = new_top
    part = row * SPLITS + split
    tl.store(top_ptr + part + tl.arange(0, 1), top)
    tl.store(total_ptr + part + tl.arange(0, 1), total)
    tl.store(acc_ptr + part * D + offs_d, acc, mask=offs_d < D)


@triton.jit
def slot_mass_kernel(q_ptr, k_ptr, kp_ptr, q_pos_ptr, kv_pos_ptr, window_ptr, sinks_ptr, lse_ptr, mass_ptr,
                     T, L, D, HEADS, KV_HEADS, POS_HEADS, CHUNK, scale, BITS: tl.constexpr,
                     GROUP_SIZE: tl.constexpr, PARAMS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Adds each slot's softmax weight from query row ``row`` into mass[b, kv head, slot]."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    bh = row // T
    b, h = bh // HEADS, bh % HEADS
    kv_head = h // (HEADS // KV_HEADS)
    kv_base = (b * KV_HEADS + kv_head) * L
    pos_base = (b * POS_HEADS + (kv_head if POS_HEADS > 1 else 0)) * L
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + row * D + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
    q_pos = tl.load(q_pos_ptr + b * T + row % T)
    window = tl.load(window_ptr + h)
    sinks = tl.load(sinks_ptr + h)
    lse = tl.load(lse_ptr + row)
    start = split * CHUNK
    stop = tl.minimum(start + CHUNK, L)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s, inside = _scores(q, q_pos, k_ptr, kp_ptr, kv_pos_ptr, kv_base, pos_base, offs_n, offs_d, stop, window,
                            sinks, scale, D, BITS, GROUP_SIZE, PARAMS)
        p = tl.where(s == float("-inf"), 0.0, tl.exp(s - lse))
        tl.atomic_add(mass_ptr + kv_base + offs_n, p, mask=inside)


def triton_cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_params: torch.Tensor | None,
                           v_params: torch.Tensor | None, q_positions: torch.Tensor, kv_positions: torch.Tensor,
                           window: list[int], sinks: list[int], scale: float, bits: int, group_size: int,
                           with_mass: bool, splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``bevel::cache_attention`` with the kernels above; ``splits`` chunks per query row (default:
    enough programs to fill the device, chunks of at least two blocks of slots)."""
    batch, heads, queries, dim = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    rows = batch * heads * queries
    if splits is None:
        splits = max(1, min(triton.cdiv(length, 2 * BLOCK_N), triton.cdiv(512, rows)))
    chunk = triton.cdiv(triton.cdiv(length, splits), BLOCK_N) * BLOCK_N
    splits = triton.cdiv(length, chunk)
    kv_pos = kv_head_positions(kv_positions).contiguous()
    q = q.contiguous()
    k, v = k.contiguous(), v.contiguous()
    k_params = k_params.contiguous() if k_params is not None else k
    v_params = v_params.contiguous() if v_params is not None else v
    window_t, sinks_t = head_values(window, heads, q.device), head_values(sinks, heads, q.device)
    top = torch.empty(rows, splits, device=q.device, dtype=torch.float32)
    total = torch.empty_like(top)
    acc = torch.empty(rows, splits, dim, device=q.device, dtype=torch.float32)
    constants = dict(BITS=bits, GROUP_SIZE=group_size if bits else 1, PARAMS=params_per_group(bits) if bits else 1,
                     BLOCK_N=BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(dim)))
    decode_attention_kernel[(rows, splits)](q, k, v, k_params, v_params, q_positions.contiguous(), kv_pos, window_t,
                                            sinks_t, top, total, acc, queries, length, dim, heads, kv_heads,
                                            kv_pos.shape[1], chunk, splits, scale, **constants)
    best = top.amax(dim=1, keepdim=True)
    weight = torch.where(torch.isfinite(top), torch.exp(top - torch.where(torch.isfinite(best), best, 0.0)), 0.0)
    norm = (weight * total).sum(dim=1)
    out = (weight[..., None] * acc).sum(dim=1) / torch.where(norm > 0, norm, 1.0)[:, None]
    out = out.reshape(batch, heads, queries, dim).to(q.dtype)
    if not with_mass:
        return out, q.new_empty(0, dtype=torch.float32)
    lse = (best.squeeze(1) + torch.log(norm)).contiguous()  # -inf for a row that sees nothing: no mass
    mass = torch.zeros(batch, kv_heads, length, device=q.device, dtype=torch.float32)
    slot_mass_kernel[(rows, splits)](q, k, k_params, q_positions.contiguous(), kv_pos, window_t, sinks_t, lse, mass,
                                     queries, length, dim, heads, kv_heads, kv_pos.shape[1], chunk, scale,
                                     **constants)
    return out, mass
