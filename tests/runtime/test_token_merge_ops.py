"""The token merging ops against a plain-Python implementation of bipartite soft matching, written
from the algorithm's description with lists and loops (no tensor ops), on small inputs: protected
tokens, padding, size tracking, clamping of r, unmerging; and the ops' fake shapes.

The cosines are computed in float64 here and in float32 by the op, so inputs are random (no two
edges within rounding of each other) and results must be identical, not merely close.
"""

from __future__ import annotations

import math

import pytest
import torch

import bevel.runtime.ops  # noqa: F401  (registers torch.ops.bevel.*)
from bevel.runtime.ops.token_merge import merged_tokens

ops = torch.ops.bevel


def python_match(metric: list[list[float]], size: list[float], r: int, protect: int) -> list[int]:
    """Each token's slot after one merge step, from the algorithm's description."""
    n = len(metric)
    r = min(r, max(n - protect, 0) // 2, max(n - 2, 0))
    if r == 0:
        return list(range(n))

    def cosine(u, v):
        dot = sum(a * b for a, b in zip(u, v))
        return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))

    set_a = [i for i in range(protect, n) if (i - protect) % 2 == 0]
    set_b = [i for i in range(protect, n) if (i - protect) % 2 == 1]
    real = [s > 0 for s in size]
    best = {}
    candidates = []  # (score, position): padding first (later first), then A tokens by their best edge
    for i in range(protect, n):
        if not real[i]:
            candidates.append((2.0 + i, i))
    for i in set_a:
        partners = [j for j in set_b if real[j]]
        if real[i] and partners:
            j = max(partners, key=lambda j: (cosine(metric[i], metric[j]), -j))
            best[i] = j
            candidates.append((cosine(metric[i], metric[j]), i))
    removed = {i for _, i in sorted(candidates, reverse=True)[:r]}
    slot_of, slot = {}, -1
    for i in range(n):
        if i not in removed:
            slot += 1
        slot_of[i] = max(slot, 0)
    return [slot_of[best[i]] if i in removed and real[i] else slot_of[i] for i in range(n)]


def python_merge(x: list[list[float]], size: list[float], dest: list[int], slots: int):
    """Size-weighted mean of the tokens of each slot, and the slots' sizes."""
    total = [0.0] * slots
    summed = [[0.0] * len(x[0]) for _ in range(slots)]
    for token, slot in enumerate(dest):
        total[slot] += size[token]
        for c, value in enumerate(x[token]):
            summed[slot][c] += value * size[token]
    return [[v / total[s] if total[s] > 0 else 0.0 for v in summed[s]] for s in range(slots)], total


def random_case(batch: int, tokens: int, channels: int, seed: int, padded: list[int] | None = None):
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(batch, tokens, channels, generator=g)
    x = torch.randn(batch, tokens, 6, generator=g)
    size = torch.randint(1, 4, (batch, tokens), generator=g).float()  # sizes from earlier merges
    for row, pads in enumerate(padded or []):
        if pads:
            size[row, tokens - pads:] = 0
    return metric, x, size


@pytest.mark.parametrize("tokens,r,protect,padded", [
    (9, 3, 1, None),          # odd count, CLS protected
    (10, 4, 0, None),         # nothing protected
    (12, 5, 2, [0, 3, 7]),    # two protected tokens; rows with 3 and 7 padded positions
    (8, 20, 1, [0, 5]),       # r above half the tokens: clamped to (8 - 1) // 2 = 3
    (6, 2, 1, [5, 2]),        # a row of one real token and padding
])
def test_match_and_merge_equal_the_python_algorithm(tokens, r, protect, padded):
    metric, x, size = random_case(len(padded or [0, 0]), tokens, 5, seed=tokens * 31 + r)
    dest = ops.bipartite_match(metric, size, r, protect)
    merged, total = ops.merge_tokens(x, size, dest, r, protect)
    slots = merged_tokens(tokens, r, protect)
    assert merged.shape == (x.shape[0], slots, 6) and total.shape == (x.shape[0], slots)
    for row in range(x.shape[0]):
        want = python_match(metric[row].double().tolist(), size[row].tolist(), r, protect)
        assert dest[row].tolist() == want
        want_x, want_total = python_merge(x[row].double().tolist(), size[row].tolist(), want, slots)
        assert total[row].tolist() == want_total
        torch.testing.assert_close(merged[row], torch.tensor(want_x, dtype=torch.float32), rtol=1e-6, atol=1e-6)


def test_protected_tokens_and_real_tokens_are_never_merged_away_or_into_padding():
    metric, x, size = random_case(3, 16, 4, seed=5, padded=[0, 6, 12])
    dest = ops.bipartite_match(metric, size, 6, 2)
    _, total = ops.merge_tokens(x, size, dest, 6, 2)
    for row in range(3):
        d = dest[row]
        assert d[0] == 0 and d[1] == 1  # protected tokens keep their slots
        kept_slots = d[size[row] > 0]
        # every real token sits in a slot of positive size; a padded slot only holds padding
        assert bool((total[row][kept_slots] > 0).all())
        assert float(total[row].sum()) == float(size[row].sum())
        # the row with 12 padded positions removes 6 of them and merges no real token
        if row == 2:
            real = (size[row] > 0).nonzero().flatten()
            assert d[real].tolist() == list(range(len(real)))


def test_no_merge_leaves_tokens_as_they_are():
    metric, x, size = random_case(2, 7, 4, seed=3)
    dest = ops.bipartite_match(metric, size, 0, 1)
    assert dest.tolist() == [list(range(7))] * 2
    merged, total = ops.merge_tokens(x, size, dest, 0, 1)
    torch.testing.assert_close(merged, x)
    assert torch.equal(total, size)


def test_unmerge_gives_each_original_token_its_slot_value():
    metric, x, size = random_case(2, 11, 4, seed=9)
    dest = ops.bipartite_match(metric, size, 4, 1)
    merged, _ = ops.merge_tokens(x, size, dest, 4, 1)
    back = ops.unmerge_tokens(merged, dest)
    assert back.shape == x.shape
    for b in range(2):
        for t in range(11):
            assert torch.equal(back[b, t], merged[b, dest[b, t]])


def test_two_steps_compose_through_the_source_map():
    """Merging twice: each original token's slot is dest2[dest1[token]], and the second merge's sizes
    are the counts of original tokens per slot."""
    metric, x, _ = random_case(2, 13, 4, seed=12)
    size = torch.ones(2, 13)
    dest1 = ops.bipartite_match(metric, size, 4, 1)
    x1, size1 = ops.merge_tokens(x, size, dest1, 4, 1)
    metric1, _ = ops.merge_tokens(metric, size, dest1, 4, 1)
    dest2 = ops.bipartite_match(metric1, size1, 3, 1)
    x2, size2 = ops.merge_tokens(x1, size1, dest2, 3, 1)
    source = dest2.gather(1, dest1)
    assert torch.equal(size2, torch.zeros_like(size2).scatter_add(1, source, torch.ones(2, 13)))
    # the size-weighted mean of two steps is the plain mean of each slot's original tokens
    want = torch.zeros_like(x2).scatter_add(1, source[..., None].expand(-1, -1, 6), x) / size2[..., None]
    torch.testing.assert_close(x2, want, rtol=1e-5, atol=1e-6)


def test_fake_shapes_follow_the_clamped_count():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 9, 6)
        dest = ops.bipartite_match(x, torch.empty(2, 9), 100, 1)
        merged, total = ops.merge_tokens(x, torch.empty(2, 9), dest, 100, 1)
        back = ops.unmerge_tokens(merged, torch.empty(2, 9, dtype=torch.int64))
    assert dest.shape == (2, 9) and dest.dtype == torch.int64
    assert merged.shape == (2, 5, 6) and total.shape == (2, 5) and back.shape == (2, 9, 6)


def test_drop_padding_moves_real_tokens_first_and_cuts_to_the_longest_row():
    x = torch.arange(2 * 6 * 2, dtype=torch.float32).reshape(2, 6, 2)
    size = torch.tensor([[1.0, 0, 2, 1, 0, 0], [0, 1, 0, 0, 0, 0]])  # padding anywhere, not only at the end
    out, out_size, dest = ops.drop_padding(x, size)
    assert out.shape == (2, 3, 2)  # the longest row has 3 real tokens
    assert torch.equal(out[0], x[0, [0, 2, 3]]) and torch.equal(out_size[0], torch.tensor([1.0, 2, 1]))
    assert torch.equal(out[1, 0], x[1, 1]) and out_size[1].tolist() == [1.0, 0, 0]
    assert dest.tolist() == [[0, 2, 1, 2, 2, 2], [1, 0, 2, 2, 2, 2]]
    # real tokens come back where they were
    back = ops.unmerge_tokens(out, dest)
    assert torch.equal(back[size > 0], x[size > 0])
    # a batch with one real token per row still keeps two tokens
    single = torch.tensor([[1.0, 0, 0], [1.0, 0, 0]])
    assert ops.drop_padding(x[:, :3], single)[0].shape == (2, 2, 2)
