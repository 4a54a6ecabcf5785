"""Which rows of a calibration activation are real tokens, and how much each one weighs.

Calibration batches of sentences are padded to their longest one. Padded positions carry
activations the model then ignores; left in the statistics a pass gathers, they would weigh as
much as real tokens (most of a batch, for short sentences). And a pass's least-squares objective
summed over tokens lets a long sequence count as much as many short ones, while a model's
fidelity is judged per example (a sentence embedding, a classification): so every example weighs
the same, each of its rows ``1 / rows it gave``.
"""

from __future__ import annotations

from typing import Any

import torch


def token_mask(batch: tuple[Any, ...]) -> torch.Tensor | None:
    """Which positions of a batch of token sequences hold real tokens: its attention mask (an input
    after the first, integer or bool, of the first input's 2-d shape and holding only 0 and 1), or
    all of them when the first input is [batch, tokens] integer ids with no such mask. None for other
    batches (images, tabular rows)."""
    first = batch[0] if batch else None
    if not isinstance(first, torch.Tensor) or first.dim() != 2:
        return None
    for candidate in batch[1:]:
        if isinstance(candidate, torch.Tensor) and candidate.shape == first.shape \
                and not candidate.is_floating_point() and not candidate.is_complex():
            mask = candidate.bool()
            if torch.equal(mask.to(candidate.dtype), candidate):
                return mask
    if first.is_floating_point() or first.is_complex():
        return None
    return torch.ones(first.shape, dtype=torch.bool, device=first.device)


def example_rows(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows [R, K] of an activation ``x`` [..., K] that real tokens gave, in float32, and each
    row's weight [R]: one over the number of rows its example gave, so that every example sums to 1.

    ``x`` is read as [batch, tokens, ..., K] when its first two dimensions are the mask's, or as
    [batch * tokens, K] when it is 2-d with one row per position of the mask (a Linear on flattened
    tokens, as GPT-2's Conv1D); other layouts keep every row, [batch, ..., K] with equal weights.
    """
    channels = x.shape[-1]
    x = x.detach().float()
    if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        per_position = x[0, 0].numel() // channels  # rows each token gave (1 for [batch, tokens, K])
        lengths = mask.sum(dim=1, keepdim=True).expand_as(mask)[mask]
        rows = x[mask].reshape(-1, channels)
        weights = (1.0 / (lengths.float() * per_position)).repeat_interleave(per_position)
        return rows, weights
    if mask is not None and x.dim() == 2 and x.shape[0] == mask.numel():
        flat = mask.reshape(-1)
        lengths = mask.sum(dim=1, keepdim=True).expand_as(mask).reshape(-1)[flat]
        return x[flat], 1.0 / lengths.float()
    rows = x.reshape(-1, channels)
    per_example = rows.shape[0] // x.shape[0] if x.dim() >= 3 else 1
    return rows, torch.full((rows.shape[0],), 1.0 / per_example)
