"""``bevel::sparse_attention``: attention decided by token positions, per-head windows with sinks,
and a block index table, computing only the key blocks the table names.

Which keys a query sees (the *position rule*, shared with ``bevel::cache_attention``): key slot
``j`` of sequence ``b`` holds the token at position ``kv_positions[b, j]`` (-1: empty); query ``i``
is at ``q_positions[b, i]``. Head ``h`` sees slot ``j`` when the slot is filled, not in the future
(``kv <= q``), and, if the head has a window ``w > 0``, within it (``q - kv < w``) or a sink
(``kv < sinks[h]``, StreamingLLM's first tokens). ``window[h] = 0`` means no window.

The block index table ``block_index`` [B, Hq, ceil(T / block), K] lists, for each query block (``block``
consecutive queries), the key blocks (``block`` consecutive slots) to compute, ascending, padded
with -1, without repeats. Keys outside them are not seen. Without a table the op builds the
smallest one the position rule allows (:func:`positional_blocks`), so a window costs only the
blocks it reaches. A query that sees no key gets zeros (dense attention would give NaN).

Keys and values come once per KV head, ``[B, Hkv, L, D]``; query head ``h`` reads KV head
``h // (Hq // Hkv)`` (grouped-query attention, as HF's ``repeat_kv``). The CPU face gathers the
listed key blocks for every query block and runs a masked softmax over them in float32, except on
the prefill of fresh sequences, where each head's band of keys (or the listed blocks) goes to fused
SDPA (``sparse_attention_cpu.py``); the CUDA face is a block-sparse flash-attention kernel
(``codegen/kernels/sparse_attention.py``).
"""

from __future__ import annotations

import math

import torch

NO_WINDOW = 0  # a head's window value meaning "every earlier key"
FAR = 1 << 62  # a position beyond any real one (pads of position ranges; exact in float64 too)
# elements of the gathered keys a CPU chunk holds at most (bounds the memory of long prefills)
_CHUNK_ELEMENTS = 1 << 23


def head_values(values: list[int], heads: int, device: torch.device) -> torch.Tensor:
    """A per-head list (one value for all heads, or one per head) as an int64 tensor [heads]."""
    if len(values) not in (1, heads):
        raise ValueError(f"expected 1 or {heads} per-head values, got {len(values)}")
    return torch.tensor(values if len(values) == heads else values * heads, dtype=torch.int64, device=device)


def kv_head_positions(kv_positions: torch.Tensor) -> torch.Tensor:
    """Slot positions as [B, Hk, L] (Hk = 1 when every KV head holds the same tokens)."""
    return kv_positions.unsqueeze(1) if kv_positions.dim() == 2 else kv_positions


def allowed(q_positions: torch.Tensor, kv_positions: torch.Tensor, window: torch.Tensor,
            sinks: torch.Tensor) -> torch.Tensor:
    """The position rule of the module docstring, broadcast: positions of queries [..., T, 1] and
    keys [..., 1, L] (or any shapes that broadcast), windows and sinks per head broadcast likewise."""
    seen = (kv_positions >= 0) & (kv_positions <= q_positions)
    near = (window <= 0) | (q_positions - kv_positions < window) | (kv_positions < sinks)
    return seen & near


def dense_mask(q_positions: torch.Tensor, kv_positions: torch.Tensor, window: list[int], sinks: list[int],
               heads: int, block_index: torch.Tensor | None = None, block: int = 64) -> torch.Tensor:
    """The boolean mask [B, heads, T, L] the op applies: the position rule, and with a table only
    the listed blocks. What dense attention needs to give the op's output."""
    kv = kv_head_positions(kv_positions)
    if kv.shape[1] > 1:  # per KV head: each query head reads its own
        kv = kv.repeat_interleave(heads // kv.shape[1], dim=1)
    w = head_values(window, heads, q_positions.device)[None, :, None, None]
    s = head_values(sinks, heads, q_positions.device)[None, :, None, None]
    mask = allowed(q_positions[:, None, :, None], kv[:, :, None, :], w, s)
    if block_index is not None:
        mask = mask & block_table_mask(block_index, q_positions.shape[1], kv.shape[-1], block)
    return mask


def listed_blocks(block_index: torch.Tensor, key_blocks: int) -> torch.Tensor:
    """The table as a block mask [B, H, query blocks, key_blocks]: True where it lists the key block."""
    # -1 entries land in an extra column that is dropped
    listed = block_index.new_zeros(*block_index.shape[:3], key_blocks + 1, dtype=torch.bool)
    listed.scatter_(3, torch.where(block_index < 0, key_blocks, block_index), True)
    return listed[..., :key_blocks]


def block_table_mask(block_index: torch.Tensor, queries: int, keys: int, block: int) -> torch.Tensor:
    """The table as an element mask [B, H, queries, keys]: True where the key's block is listed for
    the query's block."""
    listed = listed_blocks(block_index, math.ceil(keys / block))
    rows = torch.arange(queries, device=block_index.device) // block
    cols = torch.arange(keys, device=block_index.device) // block
    return listed[:, :, rows][:, :, :, cols]


def block_ranges(kv_positions: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest and largest position each key block holds, [B, Hk, ceil(L / block)]; an empty
    block has smallest > largest (a large value and -1)."""
    kv = kv_head_positions(kv_positions)
    pad = (-kv.shape[-1]) % block
    kv = torch.nn.functional.pad(kv, (0, pad), value=-1).reshape(*kv.shape[:2], -1, block)
    smallest = torch.where(kv >= 0, kv, FAR).amin(dim=-1)
    return smallest, kv.amax(dim=-1)


def query_ranges(q_positions: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest and largest query position of each query block, [B, ceil(T / block)]."""
    pad = (-q_positions.shape[-1]) % block
    blocks = q_positions.shape[-1] // block + (pad > 0)
    low = torch.nn.functional.pad(q_positions, (0, pad), value=FAR)
    high = torch.nn.functional.pad(q_positions, (0, pad), value=-1)
    return low.reshape(-1, blocks, block).amin(-1), high.reshape(-1, blocks, block).amax(-1)


def reachable_blocks(q_positions: torch.Tensor, kv_positions: torch.Tensor, window: torch.Tensor,
                     sinks: torch.Tensor, block: int, heads: int) -> torch.Tensor:
    """[B, heads, query blocks, key blocks]: whether any query of the block may see any key of the
    key block under the position rule (a superset of the pairs it allows, from block ranges)."""
    q_low, q_high = (x[:, None, :, None] for x in query_ranges(q_positions, block))
    k_low, k_high = block_ranges(kv_positions, block)
    if k_low.shape[1] > 1:  # a table per query head: each reads its KV head's slots
        group = heads // k_low.shape[1]
        k_low, k_high = k_low.repeat_interleave(group, 1), k_high.repeat_interleave(group, 1)
    k_low, k_high = k_low[:, :, None, :], k_high[:, :, None, :]
    w, s = window[None, :, None, None], sinks[None, :, None, None]
    filled = k_low <= k_high
    return filled & (k_low <= q_high) & ((w <= 0) | (q_low - k_high < w) | (k_low < s))


def as_block_table(keep: torch.Tensor) -> torch.Tensor:
    """A block mask [..., key blocks] as a table: the kept block numbers ascending, -1 after them."""
    blocks = keep.shape[-1]
    numbers = torch.arange(blocks, device=keep.device).expand(keep.shape)
    ordered = torch.where(keep, numbers, blocks).sort(dim=-1).values
    return torch.where(ordered == blocks, -1, ordered)


def positional_blocks(q_positions: torch.Tensor, kv_positions: torch.Tensor, window: list[int],
                      sinks: list[int], block: int, heads: int) -> torch.Tensor:
    """The table the op uses when none is given: every key block the position rule may reach."""
    device = q_positions.device
    keep = reachable_blocks(q_positions, kv_positions, head_values(window, heads, device),
                            head_values(sinks, heads, device), block, heads)
    return as_block_table(keep)


def sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor,
                               kv_positions: torch.Tensor, window: list[int], sinks: list[int],
                               block_index: torch.Tensor | None, block: int, scale: float) -> torch.Tensor:
    """The op in plain torch (see the module docstring), in float32, by chunks of query blocks."""
    batch, heads, queries, _ = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    if block_index is None:
        block_index = positional_blocks(q_positions, kv_positions, window, sinks, block, heads)
    device = q.device
    w = head_values(window, heads, device)[None, :, None, None, None]
    s = head_values(sinks, heads, device)[None, :, None, None, None]
    kv_of = torch.arange(heads, device=device) // (heads // kv_heads)
    # one flat row per (KV head, slot): a single gather fetches every head's key blocks
    k_flat, v_flat = k.float().reshape(batch, -1, k.shape[-1]), v.float().reshape(batch, -1, v.shape[-1])
    kv_pos = kv_head_positions(kv_positions)
    pos_flat = kv_pos.reshape(batch, -1)
    pos_head = kv_of if kv_pos.shape[1] > 1 else torch.zeros_like(kv_of)
    query_blocks = block_index.shape[2]
    pad = query_blocks * block - queries
    q_blocks = torch.nn.functional.pad(q.float(), (0, 0, 0, pad)).reshape(batch, heads, query_blocks, block, -1)
    q_pos = torch.nn.functional.pad(q_positions, (0, pad)).reshape(batch, 1, query_blocks, block, 1)
    out = q.new_zeros(batch, heads, query_blocks, block, v.shape[-1], dtype=torch.float32)
    counts = (block_index >= 0).sum(-1)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * heads * width * block * k.shape[-1]))
    offsets = torch.arange(block, device=device)
    for start in range(0, query_blocks, chunk):
        stop = min(start + chunk, query_blocks)
        table = block_index[:, :, start:stop, :width]
        slot = table.clamp_min(0)[..., None] * block + offsets  # [B, H, C, width, block]
        valid = (table[..., None] >= 0) & (slot < keys)
        slot = slot.clamp_max(keys - 1).flatten(3)  # [B, H, C, width * block]
        rows = (kv_of[None, :, None, None] * keys + slot).reshape(batch, -1)
        key = k_flat.gather(1, rows[..., None].expand(-1, -1, k_flat.shape[-1])).reshape(*slot.shape, -1)
        value = v_flat.gather(1, rows[..., None].expand(-1, -1, v_flat.shape[-1])).reshape(*slot.shape, -1)
        position = pos_flat.gather(1, (pos_head[None, :, None, None] * keys + slot).reshape(batch, -1))
        position = torch.where(valid.flatten(3), position.reshape(slot.shape), -1)[:, :, :, None, :]
        scores = q_blocks[:, :, start:stop] @ key.transpose(-1, -2) * scale  # [B, H, C, block, width * block]
        seen = allowed(q_pos[:, :, start:stop], position, w, s)
        out[:, :, start:stop] = masked_softmax_values(scores, seen, value)
    return out.reshape(batch, heads, -1, v.shape[-1])[:, :, :queries].to(q.dtype)


def masked_softmax_values(scores: torch.Tensor, seen: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """softmax(scores over the seen keys) @ values, zeros for a query that sees no key."""
    scores = scores.masked_fill(~seen, -torch.inf)
    top = scores.amax(dim=-1, keepdim=True)
    weights = torch.exp(scores - torch.where(torch.isfinite(top), top, 0.0))
    total = weights.sum(dim=-1, keepdim=True)
    return (weights @ values) / torch.where(total > 0, total, 1.0)


def positional_density(queries: int, window: list[int], sinks: list[int], heads: int) -> float:
    """``element_density`` of the position rule alone for one sequence of ``queries`` tokens at positions
    0, 1, ...: the share of causal pairs it keeps, from counts (no mask)."""
    causal = queries * (queries + 1) // 2
    kept = 0
    for w, s in zip(window * heads if len(window) == 1 else window, sinks * heads if len(sinks) == 1 else sinks):
        if w <= 0 or w >= queries:
            kept += causal
            continue
        # query p sees min(p + 1, w) recent keys and the sinks before its window
        recent = w * (w + 1) // 2 + (queries - w) * w
        kept += recent + sum(min(s, p + 1 - w) for p in range(w, queries))
    return kept / (causal * heads) if causal else 1.0


def attention_flops(node) -> int:
    """FLOPs of a ``sparse_attention`` or ``cache_attention`` node at the example sizes: those of dense
    attention (as counted for SDPA) times the share of causal pairs its windows keep in a fresh
    sequence. A block table's further savings depend on the data and are not counted."""
    from bevel.ir.meta import concrete

    batch, heads, queries, dim = (concrete(d) for d in node.args[0].meta["val"].shape)
    keys = concrete(node.args[1].meta["val"].shape[2])
    dense = 2 * batch * heads * queries * keys * (dim + dim)
    window, sinks = node.args[5:7] if node.target == sparse_attention._opoverload else node.args[7:9]
    return int(dense * positional_density(keys, list(window), list(sinks), heads))


@torch.library.custom_op("bevel::sparse_attention", mutates_args=())
def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor,
                     kv_positions: torch.Tensor, window: list[int], sinks: list[int],
                     block_index: torch.Tensor | None, block: int, scale: float) -> torch.Tensor:
    """Attention of ``q`` [B, Hq, T, D] over ``k``, ``v`` [B, Hkv, L, D] under the position rule and the
    block table of the module docstring; [B, Hq, T, Dv] in ``q``'s dtype."""
    return sparse_attention_reference(q, k, v, q_positions, kv_positions, window, sinks, block_index, block, scale)


@sparse_attention.register_fake
def _(q, k, v, q_positions, kv_positions, window, sinks, block_index, block, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@sparse_attention.register_kernel("cpu")
def _(q, k, v, q_positions, kv_positions, window, sinks, block_index, block, scale):
    from bevel.runtime.ops.sparse_attention_cpu import banded_attention, fresh_prefill, tabled_attention

    if fresh_prefill(q, k, q_positions, kv_positions):
        if block_index is None:
            return banded_attention(q, k, v, window, sinks, scale)
        return tabled_attention(q, k, v, window, sinks, block_index, block, scale)
    return sparse_attention_reference(q, k, v, q_positions, kv_positions, window, sinks, block_index, block, scale)


@sparse_attention.register_kernel("cuda")
def _(q, k, v, q_positions, kv_positions, window, sinks, block_index, block, scale):
    from bevel.codegen.kernels.sparse_attention import triton_sparse_attention

    return triton_sparse_attention(q, k, v, q_positions, kv_positions, window, sinks, block_index, block, scale)


def _register_flops() -> None:
    from bevel.ir.analysis import register_flops

    register_flops(sparse_attention._opoverload, attention_flops)


_register_flops()
