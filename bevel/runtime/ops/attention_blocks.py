"""``bevel::estimate_attention_blocks``: the block index table of a block-sparse prefill, estimated from
pooled queries and keys (the block-sparse pattern of MInference, Jiang et al. 2024).

Each query block's queries and each key block's filled slots are averaged; their scaled dot products
estimate how much attention a query block gives a key block, and a softmax over the key blocks it
may reach (causally, by positions) turns that into shares. Kept are always the sink blocks (holding
a position below ``sinks``), the diagonal block and the ``local`` key blocks before it (holding a
position within ``local * block`` before the query block's first), then the best estimated others:
with ``density`` > 0 up to ``ceil(density x reachable blocks)`` per query block, else until the kept
shares sum to ``threshold``. ``kv_positions`` is [B, L] (one set of slots for every head).
A step of fewer queries than a block (a decode step, a short prompt) keeps every reachable block:
its estimate would rest on too few queries to be worth the risk.

The table feeds ``bevel::sparse_attention``, which applies the position rule inside the kept
blocks. Plain torch on [B, H, blocks, blocks] tensors, so it runs on any device as it is.
"""

from __future__ import annotations

import torch

from bevel.runtime.ops.sparse_attention import as_block_table, block_ranges, query_ranges, reachable_blocks


def pooled(x: torch.Tensor, block: int, filled: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of each block of ``block`` rows of ``x`` [B, H, N, D] (only the ``filled`` [B, Hf, N] rows
    where given), float32 [B, H, ceil(N / block), D]."""
    pad = (-x.shape[2]) % block
    rows = torch.nn.functional.pad(x.float(), (0, 0, 0, pad)).reshape(*x.shape[:2], -1, block, x.shape[-1])
    if filled is None:
        filled = torch.arange(x.shape[2] + pad, device=x.device) < x.shape[2]
        weight = filled.float().reshape(1, 1, -1, block, 1)
    else:
        weight = torch.nn.functional.pad(filled.float(), (0, pad)).reshape(*filled.shape[:2], -1, block, 1)
    return (rows * weight).sum(3) / weight.sum(3).clamp_min(1.0)


def estimate_blocks_reference(q: torch.Tensor, k: torch.Tensor, q_positions: torch.Tensor,
                              kv_positions: torch.Tensor, block: int, density: float, threshold: float, sinks: int,
                              local: int, scale: float) -> torch.Tensor:
    """The table of the module docstring, [B, Hq, ceil(T / block), ceil(L / block)], -1 padded."""
    heads, kv_heads = q.shape[1], k.shape[1]
    no_window = torch.zeros(heads, dtype=torch.int64, device=q.device)
    reach = reachable_blocks(q_positions, kv_positions, no_window, no_window, block, heads)
    if q.shape[2] < block:
        return as_block_table(reach)
    pooled_k = pooled(k, block, kv_positions[:, None] >= 0).repeat_interleave(heads // kv_heads, dim=1)
    scores = pooled(q, block) @ pooled_k.transpose(-1, -2) * scale
    share = torch.softmax(scores.masked_fill(~reach, -torch.inf), dim=-1).nan_to_num(0.0)
    q_low = query_ranges(q_positions, block)[0][:, None, :, None]
    k_low, k_high = (x[:, :, None, :] for x in block_ranges(kv_positions, block))
    forced = reach & ((k_low < sinks) | (k_high >= q_low - local * block))
    # forced blocks first (shares are at most 1), then the estimate's order, unreachable ones last
    ranked = torch.where(forced, 2.0, torch.where(reach, share, -1.0)).argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(ranked).scatter_(-1, ranked, torch.arange(ranked.shape[-1], device=q.device)
                                             .expand_as(ranked))
    if density > 0:
        budget = torch.ceil(reach.sum(-1, keepdim=True) * density)
        keep = rank < torch.maximum(budget, forced.sum(-1, keepdim=True).float())
    else:
        # the smallest prefix of the ranking whose shares reach the threshold
        before = share.gather(-1, ranked).cumsum(-1) - share.gather(-1, ranked)
        keep = (before < threshold).gather(-1, rank) | forced
    return as_block_table(keep & reach)


@torch.library.custom_op("bevel::estimate_attention_blocks", mutates_args=())
def estimate_attention_blocks(q: torch.Tensor, k: torch.Tensor, q_positions: torch.Tensor,
                              kv_positions: torch.Tensor, block: int, density: float, threshold: float, sinks: int,
                              local: int, scale: float) -> torch.Tensor:
    """The block index table [B, Hq, ceil(T / block), ceil(L / block)] (int64, -1 padded) of a
    block-sparse step for ``q`` [B, Hq, T, D] and ``k`` [B, Hkv, L, D] (see the module docstring)."""
    return estimate_blocks_reference(q, k, q_positions, kv_positions, block, density, threshold, sinks, local, scale)


@estimate_attention_blocks.register_fake
def _(q, k, q_positions, kv_positions, block, density, threshold, sinks, local, scale):
    query_blocks = (q.shape[2] + block - 1) // block
    key_blocks = (k.shape[2] + block - 1) // block
    return q.new_empty((q.shape[0], q.shape[1], query_blocks, key_blocks), dtype=torch.int64)


def element_density(table: torch.Tensor, q_positions: torch.Tensor, kv_positions: torch.Tensor, window: list[int],
                    sinks: list[int], block: int) -> float:
    """The share of the causally visible (query, key) pairs a table and position rule compute, over
    every head: 1.0 is dense causal attention."""
    from bevel.runtime.ops.sparse_attention import dense_mask

    heads = table.shape[1]
    causal = dense_mask(q_positions, kv_positions, [0], [0], heads)
    kept = dense_mask(q_positions, kv_positions, window, sinks, heads, table, block)
    return float(kept.sum()) / max(1, float(causal.sum()))
