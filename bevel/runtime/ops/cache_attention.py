"""``bevel::cache_attention``: attention over a KV cache as it is stored, float or quantized
(``bevel::quantize_kv``'s codes, dequantized inside), with slots in any order, and optionally the
attention mass each slot received (what heavy-hitter eviction accumulates).

Which slots a query sees is the position rule of ``bevel::sparse_attention`` (filled, not in the
future, within the head's window or a sink); ``kv_positions`` is [B, L] or, when each KV head keeps
its own tokens (after eviction), [B, Hkv, L]. ``bits`` is 0 for a float cache, else 8 or 4 with the
group parameters ``k_params``/``v_params`` of ``kv_quant``. With ``with_mass`` the second output
[B, Hkv, L] (float32) sums, per slot, the softmax weights it got from every query of the step and
every query head reading that KV head; otherwise it is empty.

Decode steps run one or a few queries over many slots: the CUDA face is a split-K ("flash
decoding") Triton kernel that reads int8 or packed int4 codes and dequantizes them in registers
(``codegen/kernels/decode_attention.py``); the CPU face is the float32 reference below.
"""

from __future__ import annotations

import torch

from bevel.runtime.ops.kv_quant import dequantize_kv_reference
from bevel.runtime.ops.sparse_attention import allowed, attention_flops, head_values, kv_head_positions

# scores a CPU chunk of queries holds at most
_CHUNK_SCORES = 1 << 24


def dequantized(cache: torch.Tensor, params: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """The cache's keys or values as float32 [B, Hkv, L, D]."""
    if bits == 0:
        return cache.float()
    return dequantize_kv_reference(cache, params, bits, group_size, torch.float32)


def cache_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_params: torch.Tensor | None,
                              v_params: torch.Tensor | None, q_positions: torch.Tensor, kv_positions: torch.Tensor,
                              window: list[int], sinks: list[int], scale: float, bits: int, group_size: int,
                              with_mass: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The op in plain torch and float32 (see the module docstring), by chunks of queries."""
    batch, heads, queries, _ = q.shape
    keys, values = dequantized(k, k_params, bits, group_size), dequantized(v, v_params, bits, group_size)
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    grouped = q.float().reshape(batch, kv_heads, group, queries, -1)
    w = head_values(window, heads, q.device).reshape(1, kv_heads, group, 1, 1)
    s = head_values(sinks, heads, q.device).reshape(1, kv_heads, group, 1, 1)
    kv_pos = kv_head_positions(kv_positions)[:, :, None, None, :]  # [B, Hk, 1, 1, L]
    out = torch.empty(batch, kv_heads, group, queries, values.shape[-1], device=q.device)
    mass = torch.zeros(batch, kv_heads, length, device=q.device) if with_mass else q.new_empty(0, dtype=torch.float32)
    chunk = max(1, _CHUNK_SCORES // max(1, batch * heads * length))
    for start in range(0, queries, chunk):
        stop = min(start + chunk, queries)
        scores = grouped[:, :, :, start:stop] @ keys[:, :, None].transpose(-1, -2) * scale  # [B, Hkv, g, c, L]
        seen = allowed(q_positions[:, None, None, start:stop, None], kv_pos, w, s)
        scores = scores.masked_fill(~seen, -torch.inf)
        top = scores.amax(dim=-1, keepdim=True)
        weights = torch.exp(scores - torch.where(torch.isfinite(top), top, 0.0))
        total = weights.sum(dim=-1, keepdim=True)
        weights = weights / torch.where(total > 0, total, 1.0)
        out[:, :, :, start:stop] = weights @ values[:, :, None]
        if with_mass:
            mass += weights.sum(dim=(2, 3))
    return out.reshape(batch, heads, queries, -1).to(q.dtype), mass


@torch.library.custom_op("bevel::cache_attention", mutates_args=())
def cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_params: torch.Tensor | None,
                    v_params: torch.Tensor | None, q_positions: torch.Tensor, kv_positions: torch.Tensor,
                    window: list[int], sinks: list[int], scale: float, bits: int, group_size: int,
                    with_mass: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` [B, Hq, T, D] over a stored cache (see the module docstring): the output
    [B, Hq, T, D] in ``q``'s dtype and the mass per slot [B, Hkv, L] (empty without ``with_mass``)."""
    return cache_attention_reference(q, k, v, k_params, v_params, q_positions, kv_positions, window, sinks, scale,
                                     bits, group_size, with_mass)


@cache_attention.register_fake
def _(q, k, v, k_params, v_params, q_positions, kv_positions, window, sinks, scale, bits, group_size, with_mass):
    dim = v.shape[-1] * 2 if bits == 4 else v.shape[-1]  # two 4-bit codes per byte
    mass = q.new_empty((k.shape[0], k.shape[1], k.shape[2]) if with_mass else (0,), dtype=torch.float32)
    return q.new_empty((*q.shape[:-1], dim)), mass


@cache_attention.register_kernel("cuda")
def _(q, k, v, k_params, v_params, q_positions, kv_positions, window, sinks, scale, bits, group_size, with_mass):
    from bevel.codegen.kernels.decode_attention import triton_cache_attention

    return triton_cache_attention(q, k, v, k_params, v_params, q_positions, kv_positions, window, sinks, scale, bits,
                                  group_size, with_mass)


def _register_flops() -> None:
    from bevel.ir.analysis import register_flops

    register_flops(cache_attention._opoverload, attention_flops)


_register_flops()
