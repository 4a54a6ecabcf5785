"""The CPU face of ``bevel::sparse_attention`` for its common case: the prefill of fresh sequences
(queries and keys at positions 0, 1, ... in every row).

Without a block table each head's window is a band below the diagonal, so a chunk of queries needs
only the sinks and the keys from ``window - 1`` before its first query to its last: those slices go
to PyTorch's fused ``scaled_dot_product_attention`` with the position rule as a boolean mask, and a
head without a window takes the plain causal call; heads are grouped by their (window, sinks). With
a table, each query block makes one call over the key blocks any head lists for it, each head masked
to its own. The reference gathers the listed key blocks for every query block and head, which
computes the same output but spends most of its time gathering (on tinylm's heads a window ran 2-6x
slower than dense SDPA that way); the banded path does about ``(chunk + window) / length`` of dense
attention's work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bevel.runtime.ops.sparse_attention import allowed, head_values, listed_blocks


def fresh_prefill(q: torch.Tensor, k: torch.Tensor, q_positions: torch.Tensor, kv_positions: torch.Tensor) -> bool:
    """Whether every row holds a fresh sequence: queries and keys at positions 0 .. T - 1, one slot each."""
    queries = q.shape[2]
    if k.shape[2] != queries or kv_positions.dim() != 2 or q_positions.shape != kv_positions.shape:
        return False
    expected = torch.arange(queries, device=q_positions.device).expand_as(q_positions)
    return torch.equal(q_positions, expected) and torch.equal(kv_positions, expected)


def chunk_size(window: int) -> int:
    """Queries per SDPA call for a band of ``window`` keys: about half the window (each query then
    computes at most 1.5 windows of keys), within 64 .. 512 so that the calls stay few and large."""
    return max(64, min(512, window // 2))


def banded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: list[int], sinks: list[int],
                     scale: float) -> torch.Tensor:
    """``bevel::sparse_attention`` without a block table on a fresh prefill (see :func:`fresh_prefill`),
    computed in float32 like the reference; [B, Hq, T, Dv] in ``q``'s dtype."""
    batch, heads, length, _ = q.shape
    group = heads // k.shape[1]
    windows = head_values(window, heads, q.device).tolist()
    head_sinks = head_values(sinks, heads, q.device).tolist()
    patterns: dict[tuple[int, int], list[int]] = {}
    for h, (w, s) in enumerate(zip(windows, head_sinks)):
        full = w <= 0 or w >= length  # the window reaches every earlier key
        patterns.setdefault((0, 0) if full else (w, min(s, length)), []).append(h)
    out = q.new_empty(batch, heads, length, v.shape[-1], dtype=torch.float32)
    positions = torch.arange(length, device=q.device)
    for (w, s), members in patterns.items():
        if len(patterns) == 1:  # every head alike: the KV heads as they are, grouped-query in SDPA
            qh, kh, vh, target = q.float(), k.float(), v.float(), slice(None)
        else:
            index = torch.tensor(members, device=q.device)
            qh, kh, vh = q[:, index].float(), k[:, index // group].float(), v[:, index // group].float()
            target = index
        gqa = qh.shape[1] != kh.shape[1]
        if w == 0:
            out[:, target] = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
            continue
        step = chunk_size(w)
        parts = []
        for start in range(0, length, step):
            stop = min(start + step, length)
            low = max(0, start - w + 1)
            sink = min(s, low)  # sinks inside the band are in it already
            keys = torch.cat([positions[:sink], positions[low:stop]])
            mask = allowed(positions[start:stop, None], keys[None, :], torch.tensor(w), torch.tensor(s))
            key = torch.cat([kh[:, :, :sink], kh[:, :, low:stop]], dim=2)
            value = torch.cat([vh[:, :, :sink], vh[:, :, low:stop]], dim=2)
            parts.append(F.scaled_dot_product_attention(qh[:, :, start:stop], key, value, attn_mask=mask,
                                                        scale=scale, enable_gqa=gqa))
        out[:, target] = torch.cat(parts, dim=2)
    return out.to(q.dtype)


def tabled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: list[int], sinks: list[int],
                     block_index: torch.Tensor, block: int, scale: float) -> torch.Tensor:
    """``bevel::sparse_attention`` with a block table on a fresh prefill: per query block, one SDPA call
    over the key blocks any row or head lists for it (sliced out once, not gathered per head), masked
    by the position rule and each head's own list; queries that see no key get zeros."""
    batch, heads, length, _ = q.shape
    group = heads // k.shape[1]
    w = head_values(window, heads, q.device)[None, :, None, None]
    s = head_values(sinks, heads, q.device)[None, :, None, None]
    # heads whose window reaches every earlier key (the usual case with a table): the position rule
    # is causality alone, the same for every head, and a query sees some key exactly where its head
    # lists a block at or before its own (its own key, or whole earlier blocks)
    causal_only = bool(((w <= 0) | (w >= length)).all())
    listed = listed_blocks(block_index, -(-length // block))  # [B, H, query blocks, key blocks]
    positions = torch.arange(length, device=q.device)
    qf, kf, vf = q.float(), k.float(), v.float()
    out = q.new_empty(batch, heads, length, v.shape[-1], dtype=torch.float32)
    for qb in range(block_index.shape[2]):
        start, stop = qb * block, min((qb + 1) * block, length)
        used = listed[:, :, qb].any(dim=0).any(dim=0).nonzero().flatten()
        if used.numel() == 0:
            out[:, :, start:stop] = 0
            continue
        slots = (used[:, None] * block + torch.arange(block, device=q.device)).flatten()
        slots = slots[slots < length]
        own = listed[:, :, qb][..., slots // block][:, :, None, :]  # each head's own list, [B, H, 1, keys]
        if causal_only:
            mask = own & (slots[None, :] <= positions[start:stop, None])
            sees = listed[:, :, qb, :qb + 1].any(dim=-1)[..., None, None]  # [B, H, 1, 1]
        else:
            mask = allowed(positions[start:stop, None], slots[None, :], w, s) & own
            sees = mask.any(-1, keepdim=True)
        part = F.scaled_dot_product_attention(qf[:, :, start:stop], kf[:, :, slots], vf[:, :, slots], attn_mask=mask,
                                              scale=scale, enable_gqa=group > 1)
        out[:, :, start:stop] = part if bool(sees.all()) else torch.where(sees, part, 0.0)
    return out.to(q.dtype)
