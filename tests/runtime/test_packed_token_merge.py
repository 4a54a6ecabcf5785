"""``bevel::bipartite_match_packed`` against a plain-Python version of the algorithm (lists and
loops, from the op's description), on packed rows holding several sequences and padding: per
sequence protection, matches within a sequence only, the fallback for rows with too few matches;
and its fake shape.

Cosines are float64 here and float32 in the op, on random inputs (no two edges within rounding of
each other), so plans must be identical.
"""

from __future__ import annotations

import math

import pytest
import torch

import bevel.runtime.ops  # noqa: F401  (registers torch.ops.bevel.*)
from bevel.runtime.ops.packed_token_merge import PROTECTED_SCORE, UNMATCHED_SCORE
from bevel.runtime.ops.token_merge import clamped_r

ops = torch.ops.bevel


def python_match_packed(metric: list[list[float]], segment: list[int], r: int, protect: int) -> list[int]:
    """Each token's slot after one merge step of a packed row, from the op's description."""
    n = len(metric)
    r = int(clamped_r(n, r, protect))
    if r == 0:
        return list(range(n))

    def cosine(u, v):
        dot = sum(a * b for a, b in zip(u, v))
        return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))

    place, start = [], 0  # each token's place in its sequence, counted after the protected ones
    for i in range(n):
        if i == 0 or segment[i] != segment[i - 1]:
            start = i
        place.append(i - start - protect)
    score, joins = {}, {}
    for i in range(n):
        if segment[i] < 0:
            score[i] = 2.0 + i  # padding first, later padding first
        elif place[i] < 0:
            score[i] = PROTECTED_SCORE - i / n
        else:
            partners = [j for j in range(n) if segment[j] == segment[i] and place[j] >= 0 and place[j] % 2 == 1]
            if place[i] % 2 == 0 and partners:
                joins[i] = max(partners, key=lambda j: cosine(metric[i], metric[j]))
                score[i] = cosine(metric[i], metric[joins[i]])
            else:
                score[i] = UNMATCHED_SCORE - i / n
    removed = set(sorted(range(n), key=lambda i: -score[i])[:r])
    slot_of, slot = [], -1
    for i in range(n):
        slot += i not in removed
        slot_of.append(max(slot, 0))
    return [slot_of[joins[i]] if i in removed and i in joins else slot_of[i] for i in range(n)]


def packed_rows(lengths: list[list[int]], width: int, channels: int, seed: int):
    """Random metric [R, width, C], sizes and segments for rows holding sequences of ``lengths``."""
    g = torch.Generator().manual_seed(seed)
    segment = torch.full((len(lengths), width), -1)
    sequence = 0
    for row, sequences in enumerate(lengths):
        at = 0
        for length in sequences:
            segment[row, at:at + length] = sequence
            sequence, at = sequence + 1, at + length
    size = torch.where(segment >= 0, torch.randint(1, 4, segment.shape, generator=g), 0).float()
    return torch.randn(len(lengths), width, channels, generator=g), size, segment


@pytest.mark.parametrize("lengths,width,r,protect", [
    ([[7, 5], [4, 3, 2], [12]], 12, 3, 1),  # several sequences per row, padding at a row's end
    ([[3, 3, 3, 3], [9, 3]], 12, 5, 1),     # short sequences: few matches each
    ([[6, 6], [5, 4]], 12, 2, 2),           # two protected tokens per sequence
    ([[2, 2, 2, 2], [8]], 8, 3, 1),         # a row of pairs has no match at all: the fallback
    ([[5, 4], [3]], 9, 20, 1),              # r above half the tokens: clamped to 4
])
def test_packed_match_equals_the_python_algorithm(lengths, width, r, protect):
    metric, size, segment = packed_rows(lengths, width, 5, seed=width * 7 + r)
    dest = ops.bipartite_match_packed(metric, size, segment, r, protect)
    for row in range(len(lengths)):
        assert dest[row].tolist() == python_match_packed(metric[row].double().tolist(), segment[row].tolist(), r,
                                                         protect)


def test_merges_stay_within_sequences_and_keep_each_sequences_first_tokens():
    lengths = [[9, 6, 4, 3], [10, 8, 2, 2], [5, 5, 5, 5, 2]]
    metric, size, segment = packed_rows(lengths, 22, 4, seed=2)
    r, protect = 5, 2  # 7 set-A tokens of row 0 have a match in their sequence: no fallback removal
    dest = ops.bipartite_match_packed(metric, size, segment, r, protect)
    x = torch.randn(3, 22, 6)
    _, total = ops.merge_tokens(x, size, dest, r, protect)
    for row in range(3):
        d, seg = dest[row], segment[row]
        for slot in d.unique().tolist():
            members = seg[(d == slot) & (seg >= 0)]
            assert len(members.unique()) <= 1, "a slot holds tokens of two sequences"
        firsts = [i for i in range(22) if seg[i] >= 0 and (i == 0 or seg[i - 1] != seg[i])]
        for first in firsts:
            for k in range(protect):
                # a protected token keeps a slot of its own: nothing else merges into it
                assert int((d == d[first + k]).sum()) == 1 and size[row, first + k] == total[row, d[first + k]]
        assert float(total[row].sum()) == float(size[row].sum())


def test_no_merge_and_fake_shape():
    metric, size, segment = packed_rows([[3, 4]], 8, 4, seed=1)
    assert ops.bipartite_match_packed(metric, size, segment, 0, 1).tolist() == [list(range(8))]
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = ops.bipartite_match_packed(mode.from_tensor(metric), mode.from_tensor(size),
                                          mode.from_tensor(segment), 2, 1)
    assert fake.shape == (1, 8) and fake.dtype == torch.int64
