"""``bevel::pack_sequences``: the real tokens of a padded batch packed into as few rows as its
longest sequence allows, so that padding is neither stored nor computed.

Each sequence keeps its tokens in order and contiguous in one row; rows are as wide as the longest
sequence (at least one token), filled first-fit in order of decreasing length. ``segment`` names
the sequence of every packed position (-1 for the padding left at the end of a row), from which
the attention of a packed row is masked block-diagonally; ``source`` gives every original token's
position in the packed rows, flattened (``row * width + column``), to unpack the result. A padding
token's source is the first position of its own sequence: what it reads back is not meant to be
used, as the padding positions of the original model's outputs are not.

Faces: the reference (also what runs on CUDA: the placement of B lengths on the host and two index
copies, nothing a kernel would speed up) and the fake. It has no ONNX form: the packing depends on
the data in a way ONNX cannot express, and export refuses a graph holding it.
"""

from __future__ import annotations

import torch


def row_placement(lengths: list[int], width: int) -> list[tuple[int, int]]:
    """(row, column) of the first token of each sequence of ``lengths``: first fit in order of
    decreasing length (ties in batch order), into rows of ``width`` tokens."""
    filled: list[int] = []
    placed = [(0, 0)] * len(lengths)
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, used in enumerate(filled) if used + lengths[index] <= width), len(filled))
        if row == len(filled):
            filled.append(0)
        placed[index] = (row, filled[row])
        filled[row] += lengths[index]
    return placed


def pack_sequences_reference(x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's meaning in plain torch (see the module docstring): ``(packed [R, W, C], segment
    [R, W] int64, source [B, N] int64)`` for ``x`` [B, N, C] whose real tokens have ``size > 0``."""
    batch, count, channels = x.shape
    real = size > 0
    lengths = real.sum(dim=1).tolist()
    width = max(max(lengths, default=0), 1)
    placed = row_placement(lengths, width)
    rows = max((row for row, _ in placed), default=0) + 1
    start = torch.tensor([row * width + column for row, column in placed], dtype=torch.int64, device=x.device)
    rank = (real.long().cumsum(dim=1) - 1).clamp_min(0)  # each real token's place in its sequence
    source = start[:, None] + torch.where(real, rank, 0)
    kept = source[real]
    packed = x.new_zeros(rows * width, channels).index_copy_(0, kept, x[real])
    sequence = torch.arange(batch, device=x.device)[:, None].expand(batch, count)[real]
    segment = torch.full((rows * width,), -1, dtype=torch.int64, device=x.device).index_copy_(0, kept, sequence)
    return packed.reshape(rows, width, channels), segment.reshape(rows, width), source


@torch.library.custom_op("bevel::pack_sequences", mutates_args=())
def pack_sequences(x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack the real tokens (``size`` [B, N] > 0) of ``x`` [B, N, C] into rows as wide as the
    longest sequence: ``(packed [R, W, C], segment [R, W], source [B, N])``; R and W depend on the
    data. See the module docstring."""
    return pack_sequences_reference(x, size)


@pack_sequences.register_fake
def _(x, size):
    ctx = torch.library.get_ctx()
    rows, width = ctx.new_dynamic_size(min=1), ctx.new_dynamic_size(min=1)
    return (x.new_empty((rows, width, x.shape[2])), size.new_empty((rows, width), dtype=torch.int64),
            size.new_empty(size.shape, dtype=torch.int64))
