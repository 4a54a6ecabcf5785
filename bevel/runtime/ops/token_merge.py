"""Token merging ops: ``bevel::bipartite_match``, ``bevel::merge_tokens``, ``bevel::unmerge_tokens``.

A merge step takes ``N`` tokens to ``N - r``. Its plan is one index per token, ``dest`` [B, N]: the
slot of the merged sequence the token goes to. Kept tokens stay in their original order (slot =
number of kept tokens before them), so a protected first token stays first. The merge is the
size-weighted average of the tokens of each slot, and sizes add up; a token of size 0 is padding,
which weighs nothing wherever it goes. ``unmerge_tokens`` reads each original token's slot back.

Matching (bipartite soft matching, Bolya et al. 2023, "Token Merging: Your ViT But Faster"): the
tokens after the ``protect`` first ones alternate into sets A and B; each real token of A finds its
most similar real token of B (cosine of ``metric``); the ``r`` A tokens with the best matches merge
into them. Padding (size 0) is removed before any real token: its removal score is above every
cosine (later padding first, so the choice is deterministic), and no real token ever merges into
padding. ``r`` is clamped to ``(N - protect) // 2`` (so there are always ``r`` tokens to remove)
and to ``N - 2``; see :func:`clamped_r`.
"""

from __future__ import annotations

import torch

# removal score of padding: above any cosine (<= 1), plus the position so that ties never occur
PADDING_SCORE = 2.0


def clamped_r(tokens, r: int, protect: int):
    """The number of tokens a step removes from ``tokens`` (an int or a SymInt): at most half of the
    unprotected ones, so that every removed A token has a B token left to go to, and never below two
    tokens left (so a merged length is never 1, which shape checks of broadcasting ops would have to
    tell apart from a real length)."""
    return torch.sym_min(torch.sym_min(r, torch.sym_max(tokens - protect, 0) // 2), torch.sym_max(tokens - 2, 0))


def merged_tokens(tokens, r: int, protect: int):
    """How many tokens a merge step with ``r`` and ``protect`` leaves of ``tokens``."""
    return tokens - clamped_r(tokens, r, protect)


def bipartite_match_reference(metric: torch.Tensor, size: torch.Tensor, r: int, protect: int) -> torch.Tensor:
    """The op's meaning in plain torch (see the module docstring); returns ``dest`` [B, N] int64."""
    batch, count, _ = metric.shape
    remove = int(clamped_r(count, r, protect))
    slots = torch.arange(count, device=metric.device).expand(batch, count)
    if remove == 0:
        return slots.clone()
    unit = metric.float() / metric.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    real = size > 0
    # similarities of the A tokens (every other one from ``protect``) to the B tokens (the others)
    similarity = unit[:, protect::2] @ unit[:, protect + 1::2].transpose(1, 2)  # [B, A, B]
    similarity = similarity.masked_fill(~real[:, None, protect + 1::2], -torch.inf)
    best_a, best_b = similarity.max(dim=-1)
    best = torch.full((batch, count), -torch.inf, device=metric.device)
    best[:, protect::2] = best_a
    best_position = torch.zeros(batch, count, dtype=torch.int64, device=metric.device)
    best_position[:, protect::2] = protect + 1 + 2 * best_b
    score = torch.where(real, best, -torch.inf)
    padding_score = PADDING_SCORE + torch.arange(count, device=metric.device, dtype=score.dtype)
    score = torch.where((slots >= protect) & ~real, padding_score, score)
    removed = score.topk(remove, dim=1).indices
    kept = torch.ones(batch, count, dtype=torch.bool, device=metric.device).scatter(1, removed, False)
    prefix = kept.long().cumsum(dim=1) - 1  # the slot of the last kept token at or before each one
    return torch.where(kept | ~real, prefix.clamp_min(0), prefix.gather(1, best_position))


def merge_tokens_reference(x: torch.Tensor, size: torch.Tensor, dest: torch.Tensor, r: int,
                           protect: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's meaning in plain torch: per slot the size-weighted mean of its tokens (in float32),
    and the slot's total size. A slot of padding only (size 0) holds zeros."""
    batch, count, channels = x.shape
    slots = int(merged_tokens(count, r, protect))
    weight = size.float()
    # one index_add over the flattened batch: on the CPU ten times faster than a scatter_add along
    # the tokens with an index expanded over the channels
    flat = (dest + torch.arange(batch, device=dest.device).unsqueeze(1) * slots).reshape(-1)
    total = weight.new_zeros(batch * slots).index_add_(0, flat, weight.reshape(-1))
    weighted = (x.float() * weight[..., None]).reshape(-1, channels)
    summed = weight.new_zeros(batch * slots, channels).index_add_(0, flat, weighted)
    merged = summed / total.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    return merged.reshape(batch, slots, channels).to(x.dtype), total.reshape(batch, slots)


def drop_padding_reference(x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's meaning in plain torch: real tokens (size > 0) moved to the front in their order and
    the batch cut to its longest row, keeping at least two tokens where there are two (as
    :func:`clamped_r`); returns the tokens, their sizes and each original token's slot (padding
    beyond the cut goes to the last slot, where it weighs nothing)."""
    batch, count = size.shape
    order = torch.argsort((size <= 0).to(torch.uint8), dim=1, stable=True)
    slots = max(int((size > 0).sum(dim=1).max()) if batch else 0, min(2, count))
    kept = order[:, :slots]
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(count, device=size.device).expand(batch, count))
    dest = rank.clamp_max(slots - 1)
    return x.gather(1, kept.unsqueeze(-1).expand(batch, slots, x.shape[-1])), size.gather(1, kept), dest


def unmerge_tokens_reference(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """The op's meaning in plain torch: ``x[b, source[b, i]]`` for every original token ``i``."""
    return x.gather(1, source.unsqueeze(-1).expand(*source.shape, x.shape[-1]))


@torch.library.custom_op("bevel::bipartite_match", mutates_args=())
def bipartite_match(metric: torch.Tensor, size: torch.Tensor, r: int, protect: int) -> torch.Tensor:
    """``dest`` [B, N] (int64): the slot in the merged sequence of ``merged_tokens(N, r, protect)``
    tokens that each token of ``metric`` [B, N, C] goes to; ``size`` [B, N] counts what each token
    stands for (0: padding)."""
    return bipartite_match_reference(metric, size, r, protect)


@bipartite_match.register_fake
def _(metric, size, r, protect):
    return metric.new_empty(metric.shape[:2], dtype=torch.int64)


@bipartite_match.register_kernel("cuda")
def _(metric, size, r, protect):
    from bevel.codegen.kernels.token_merge import triton_bipartite_match

    return triton_bipartite_match(metric, size, r, protect)


@torch.library.custom_op("bevel::merge_tokens", mutates_args=())
def merge_tokens(x: torch.Tensor, size: torch.Tensor, dest: torch.Tensor, r: int,
                 protect: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``x`` [B, N, C] by the plan ``dest`` of :func:`bipartite_match` (made with the same
    ``r`` and ``protect``, which fix the output length): the size-weighted mean per slot [B, M, C]
    and the slots' sizes [B, M] (float32)."""
    return merge_tokens_reference(x, size, dest, r, protect)


@merge_tokens.register_fake
def _(x, size, dest, r, protect):
    tokens = x.shape[1]
    if isinstance(tokens, int):
        slots = merged_tokens(tokens, r, protect)
    else:
        # a new size rather than the formula: nested min/floordiv expressions of a few merges make
        # symbolic shape reasoning explode. At least 2 (see clamped_r; a symbolic length is >= 2)
        slots = torch.library.get_ctx().new_dynamic_size(min=2)
    return x.new_empty((x.shape[0], slots, x.shape[2])), x.new_empty((x.shape[0], slots), dtype=torch.float32)


@merge_tokens.register_kernel("cuda")
def _(x, size, dest, r, protect):
    from bevel.codegen.kernels.token_merge import triton_merge_tokens

    return triton_merge_tokens(x, size, dest, int(merged_tokens(x.shape[1], r, protect)))


@torch.library.custom_op("bevel::drop_padding", mutates_args=())
def drop_padding(x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move the real tokens of ``x`` [B, N, C] (``size`` [B, N] > 0) to the front and cut the batch
    to its longest row: tokens [B, M, C], sizes [B, M] and each original token's slot [B, N].
    M depends on the data: the most real tokens of any row, at least two (where N allows)."""
    return drop_padding_reference(x, size)


@drop_padding.register_fake
def _(x, size):
    tokens = x.shape[1]
    # decided by the data; at least two where there are two (a symbolic length is >= 2)
    slots = tokens if isinstance(tokens, int) and tokens < 2 else torch.library.get_ctx().new_dynamic_size(min=2)
    return (x.new_empty((x.shape[0], slots, x.shape[2])), size.new_empty((size.shape[0], slots)),
            size.new_empty(size.shape, dtype=torch.int64))


@torch.library.custom_op("bevel::unmerge_tokens", mutates_args=())
def unmerge_tokens(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """The merged tokens ``x`` [B, M, C] spread back over the original ones: [B, L, C], where
    ``source`` [B, L] holds each original token's slot after the last merge."""
    return unmerge_tokens_reference(x, source)


@unmerge_tokens.register_fake
def _(x, source):
    return x.new_empty((*source.shape, x.shape[-1]))
