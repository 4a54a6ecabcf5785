"""``bevel::bipartite_match_packed``: bipartite soft matching of rows that hold several sequences.

After ``bevel::pack_sequences`` a row holds the tokens of several sequences, each contiguous, and
``segment`` [R, N] names the sequence of every position (-1: the padding at a row's end). The
matching is ToMe's (see :mod:`bevel.runtime.ops.token_merge`) applied to each sequence of a row,
with the ``r`` merges chosen over the whole row:

- ``protect`` counts the leading tokens of *each* sequence (its CLS token), which are neither
  removed nor merged into; after them the sequence's tokens alternate into sets A and B as in
  ToMe, and a token of A only matches a token of B of its own sequence;
- a real token is removed only to merge within its own sequence: the ``r`` removed tokens are the
  padding first, then the set-A tokens with the best same-sequence matches, and only if a row has
  fewer of those, other unprotected tokens (earlier ones first), which join the kept token just
  before them: of their own sequence, whose first token is kept, and possibly a protected one (the
  only way anything merges into a protected token). A row whose unprotected tokens are fewer than ``r``
  (sequences shorter than ``2 * protect`` tokens filling more than half of it) has protected tokens
  removed the same way, into the token before them, which may belong to the previous sequence; the
  sequences tokenizers make (a CLS and a SEP token at least) never come close with ``protect=1``.

The merged row keeps the order of its kept tokens, so sequences stay contiguous, and
``bevel::merge_tokens`` applies the plan with the same ``r`` and ``protect``. Faces: the reference
(also what runs on CUDA) and the fake; a packed graph does not export to ONNX (see
:mod:`bevel.runtime.ops.sequence_pack`).
"""

from __future__ import annotations

import torch

from bevel.runtime.ops.token_merge import PADDING_SCORE, clamped_r

# removal scores below any cosine (>= -1): tokens with no same-sequence match, then protected ones;
# within each, earlier tokens first (the position takes off less than 1)
UNMATCHED_SCORE = -2.0
PROTECTED_SCORE = -3.0


def sequence_positions(segment: torch.Tensor) -> torch.Tensor:
    """[R, N]: each token's position in its own sequence (sequences are contiguous in a row)."""
    positions = torch.arange(segment.shape[1], device=segment.device)
    before = torch.cat([segment.new_full((segment.shape[0], 1), -2), segment[:, :-1]], dim=1)
    starts = torch.where(segment != before, positions, 0).cummax(dim=1).values
    return positions - starts


def bipartite_match_packed_reference(metric: torch.Tensor, size: torch.Tensor, segment: torch.Tensor, r: int,
                                     protect: int) -> torch.Tensor:
    """The op's meaning in plain torch (see the module docstring); returns ``dest`` [R, N] int64."""
    rows, count, _ = metric.shape
    remove = int(clamped_r(count, r, protect))
    positions = torch.arange(count, device=metric.device)
    if remove == 0:
        return positions.expand(rows, count).clone()
    real = (segment >= 0) & (size > 0)
    place = sequence_positions(segment) - protect  # as ToMe: sets alternate after the protected tokens
    protected = real & (place < 0)
    movable = real & ~protected
    in_a, in_b = movable & (place % 2 == 0), movable & (place % 2 == 1)
    unit = metric.float() / metric.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    allowed = in_a[:, :, None] & in_b[:, None, :] & (segment[:, :, None] == segment[:, None, :])
    best, best_position = (unit @ unit.transpose(1, 2)).masked_fill(~allowed, -torch.inf).max(dim=-1)
    matched = best.isfinite()
    earlier_first = -positions.float() / count  # in (-1, 0]: no ties, so the choice is deterministic
    score = torch.where(matched, best, UNMATCHED_SCORE + earlier_first)
    score = torch.where(protected, PROTECTED_SCORE + earlier_first, score)
    score = torch.where(real, score, PADDING_SCORE + positions.float())
    removed = score.topk(remove, dim=1).indices
    kept = torch.ones(rows, count, dtype=torch.bool, device=metric.device).scatter(1, removed, False)
    prefix = (kept.long().cumsum(dim=1) - 1).clamp_min(0)  # the slot of the last kept token at or before each one
    # a removed token joins its match, or else the kept token before it (itself removed)
    return prefix.gather(1, torch.where(kept | ~matched, positions, best_position))


@torch.library.custom_op("bevel::bipartite_match_packed", mutates_args=())
def bipartite_match_packed(metric: torch.Tensor, size: torch.Tensor, segment: torch.Tensor, r: int,
                           protect: int) -> torch.Tensor:
    """``dest`` [R, N] (int64): the slot each token of the packed rows ``metric`` [R, N, C] goes to,
    merging ``r`` tokens per row within sequences (``segment`` [R, N], -1 for padding; ``size``
    [R, N] what each token stands for). See the module docstring."""
    return bipartite_match_packed_reference(metric, size, segment, r, protect)


@bipartite_match_packed.register_fake
def _(metric, size, segment, r, protect):
    return metric.new_empty(metric.shape[:2], dtype=torch.int64)
