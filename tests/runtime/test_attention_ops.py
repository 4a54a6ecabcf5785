"""The attention and KV-cache ops against dense attention with the equivalent boolean mask.

The mask is written here from the ops' description with Python loops (not with the ops' own
helpers): a key slot is seen when it is filled, not in the future, within the head's window or a
sink, and (with a block table) in a listed block. ``F.scaled_dot_product_attention`` with that mask
is the ground truth; the ops sum the same float32 products in another order, hence 1e-5. Rows that
see no key are compared with zeros (SDPA gives NaN there). Inputs: ragged lengths (not multiples of
the block), left-padded rows, grouped-query attention (6 query heads over 2 KV heads).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import bevel.runtime.ops  # noqa: F401  (registers torch.ops.bevel.*)
from bevel.runtime.ops.attention_blocks import element_density
from bevel.runtime.ops.kv_quant import quantize_kv_reference
from bevel.runtime.ops.sparse_attention_cpu import fresh_prefill
from tests.models_zoo import seeded

ops = torch.ops.bevel
HEADS, KV_HEADS, DIM = 6, 2, 32
SCALE = DIM ** -0.5


def prefill_case(batch: int, tokens: int, pads: list[int], seed: int):
    """q [B, 6, T, 32], k and v [B, 2, T, 32], positions of left-padded rows."""
    g = seeded(seed)
    q = torch.randn(batch, HEADS, tokens, DIM, generator=g)
    k, v = (torch.randn(batch, KV_HEADS, tokens, DIM, generator=g) for _ in range(2))
    slots = torch.arange(tokens)[None]
    pad = torch.tensor(pads)[:, None]
    q_pos = (slots - pad).clamp(min=0)
    kv_pos = torch.where(slots >= pad, slots - pad, -1)
    return q, k, v, q_pos, kv_pos


def loop_mask(q_pos, kv_pos, window, sinks, table=None, block=None) -> torch.Tensor:
    """[B, H, T, L] from the description, one pair at a time; ``kv_pos`` [B, L] or [B, Hkv, L]."""
    batch, queries = q_pos.shape
    keys = kv_pos.shape[-1]
    window = window * HEADS if len(window) == 1 else window
    sinks = sinks * HEADS if len(sinks) == 1 else sinks
    mask = torch.zeros(batch, HEADS, queries, keys, dtype=torch.bool)
    for b in range(batch):
        for h in range(HEADS):
            listed = None
            if table is not None:
                listed = [set(int(x) for x in row if x >= 0) for row in table[b, h]]
            positions = kv_pos[b] if kv_pos.dim() == 2 else kv_pos[b, h // (HEADS // KV_HEADS)]
            for i in range(queries):
                q = int(q_pos[b, i])
                for j in range(keys):
                    kv = int(positions[j])
                    ok = 0 <= kv <= q and (window[h] <= 0 or q - kv < window[h] or kv < sinks[h])
                    if listed is not None:
                        ok = ok and (j // block) in listed[i // block]
                    mask[b, h, i, j] = ok
    return mask


def dense(q, k, v, mask) -> torch.Tensor:
    """SDPA with the mask; zeros where a query sees nothing."""
    group = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                         attn_mask=mask, scale=SCALE)
    return torch.where(mask.any(-1, keepdim=True), out, 0.0)


PATTERNS = [
    ([0], [0]),                                   # full causal attention
    ([16], [4]),                                  # a window with sinks
    ([16], [0]),                                  # a window without sinks
    ([8, 0, 16, 4, 0, 30], [2, 0, 1, 0, 0, 3]),  # per-head: streaming and full heads
]


@pytest.mark.parametrize("window,sinks", PATTERNS)
@pytest.mark.parametrize("block", [16, 32])
def test_sparse_attention_equals_dense_masked_attention(window, sinks, block):
    q, k, v, q_pos, kv_pos = prefill_case(2, 70, [0, 9], seed=block)
    out = ops.sparse_attention(q, k, v, q_pos, kv_pos, window, sinks, None, block, SCALE)
    torch.testing.assert_close(out, dense(q, k, v, loop_mask(q_pos, kv_pos, window, sinks)), rtol=1e-5, atol=1e-5)


# fresh sequences of 200 tokens: several query chunks per band (chunks of 64 to 75 queries), sinks
# before and inside the band, a window longer than the sequence, full and windowed heads together
FRESH_PATTERNS = PATTERNS[1:] + [([150], [3]), ([300], [2]), ([20, 150, 0, 20, 150, 0], [4, 0, 0, 4, 90, 0])]


@pytest.mark.parametrize("window,sinks", FRESH_PATTERNS)
def test_sparse_attention_on_fresh_sequences_takes_the_banded_path_and_equals_dense(window, sinks):
    q, k, v, q_pos, kv_pos = prefill_case(2, 200, [0, 0], seed=len(window) + window[0])
    assert fresh_prefill(q, k, q_pos, kv_pos)  # the CPU face runs banded_attention on these
    out = ops.sparse_attention(q, k, v, q_pos, kv_pos, window, sinks, None, 16, SCALE)
    torch.testing.assert_close(out, dense(q, k, v, loop_mask(q_pos, kv_pos, window, sinks)), rtol=1e-5, atol=1e-5)


def test_left_padded_rows_are_not_a_fresh_prefill():
    q, k, _, q_pos, kv_pos = prefill_case(2, 20, [0, 3], seed=0)
    assert not fresh_prefill(q, k, q_pos, kv_pos)  # the CPU face runs the reference on these


@pytest.mark.parametrize("window,sinks", [([0], [0]), ([20, 150, 0, 20, 150, 0], [4, 0, 0, 4, 90, 0])])
def test_block_table_on_fresh_sequences_takes_the_sliced_path_and_equals_dense(window, sinks):
    q, k, v, q_pos, kv_pos = prefill_case(2, 200, [0, 0], seed=11)
    block = 16
    table = ops.estimate_attention_blocks(q, k, q_pos, kv_pos, block, 0.3, 0.0, 1, 1, SCALE)
    table[0, 1, 3] = -1  # one query block of one head and row lists nothing: its queries get zeros
    assert fresh_prefill(q, k, q_pos, kv_pos)  # the CPU face runs tabled_attention on these
    out = ops.sparse_attention(q, k, v, q_pos, kv_pos, window, sinks, table, block, SCALE)
    mask = loop_mask(q_pos, kv_pos, window, sinks, table, block)
    assert not mask[0, 1, 3 * block:4 * block].any()
    torch.testing.assert_close(out, dense(q, k, v, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("density,threshold", [(0.3, 0.0), (0.0, 0.6), (1.0, 0.0)])
def test_estimated_blocks_keep_forced_blocks_and_equal_dense_with_their_mask(density, threshold):
    q, k, v, q_pos, kv_pos = prefill_case(2, 150, [0, 21], seed=3)
    block, sinks, local = 16, 4, 1
    table = ops.estimate_attention_blocks(q, k, q_pos, kv_pos, block, density, threshold, sinks, local, SCALE)
    assert table.shape == (2, HEADS, math.ceil(150 / block), math.ceil(150 / block))
    for b, pad in enumerate([0, 21]):
        for qb in range(table.shape[2]):
            kept = set(table[b, 0, qb][table[b, 0, qb] >= 0].tolist())
            last = min(150, (qb + 1) * block) - 1 - pad  # the block's largest query position
            if last < 0:
                continue
            first = max(0, qb * block - pad)
            # the sink block (holding position 0), the diagonal block and the local block before it
            assert pad // block in kept and (first + pad) // block in kept
            local_slot = first + pad - local * block
            if local_slot >= pad:  # a filled slot
                assert local_slot // block in kept
            assert all(kb * block - pad <= last for kb in kept)  # nothing after the query block
    out = ops.sparse_attention(q, k, v, q_pos, kv_pos, [0], [0], table, block, SCALE)
    mask = loop_mask(q_pos, kv_pos, [0], [0], table, block)
    torch.testing.assert_close(out, dense(q, k, v, mask), rtol=1e-5, atol=1e-5)
    share = element_density(table, q_pos, kv_pos, [0], [0], block)
    assert share == pytest.approx(float(mask.sum()) / float(loop_mask(q_pos, kv_pos, [0], [0]).sum()))
    if density == 1.0:
        assert share == 1.0


def test_table_sparser_than_the_rule_and_queries_that_see_nothing_give_zeros():
    q, k, v, q_pos, kv_pos = prefill_case(1, 40, [0], seed=4)
    table = torch.full((1, HEADS, 3, 3), -1, dtype=torch.int64)
    table[:, :, :, 0] = 2  # every query block sees only the last key block: the first two see nothing
    out = ops.sparse_attention(q, k, v, q_pos, kv_pos, [0], [0], table, 16, SCALE)
    mask = loop_mask(q_pos, kv_pos, [0], [0], table, 16)
    assert not mask[:, :, :32].any() and mask[:, :, 32:].any(-1).all()
    torch.testing.assert_close(out, dense(q, k, v, mask), rtol=1e-5, atol=1e-5)
    assert bool((out[:, :, :32] == 0).all())


def test_sparse_attention_in_bfloat16_matches_float32_within_one_rounding():
    q, k, v, q_pos, kv_pos = prefill_case(2, 50, [0, 3], seed=5)
    out = ops.sparse_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), q_pos, kv_pos, [16], [4], None, 16, SCALE)
    ref = ops.sparse_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), q_pos, kv_pos,
                               [16], [4], None, 16, SCALE)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=8e-3, atol=8e-3)  # computed in float32, rounded once


def decode_case(seed: int):
    """Two decode queries per row over 45 slots in no particular order, some empty, positions per
    KV head for the second case."""
    g = seeded(seed)
    q = torch.randn(2, HEADS, 2, DIM, generator=g)
    k, v = (torch.randn(2, KV_HEADS, 45, DIM, generator=g) for _ in range(2))
    kv_pos = torch.stack([torch.randperm(45, generator=g) for _ in range(2)])
    kv_pos[1, :7] = -1
    q_pos = torch.tensor([[45, 46], [38, 39]])
    per_head = torch.stack([torch.stack([torch.randperm(60, generator=g)[:45] for _ in range(KV_HEADS)])
                            for _ in range(2)])
    return q, k, v, q_pos, kv_pos, per_head


@pytest.mark.parametrize("window,sinks", PATTERNS[:2] + PATTERNS[3:])
@pytest.mark.parametrize("per_head", [False, True])
def test_cache_attention_equals_dense_and_its_mass_sums_the_weights(window, sinks, per_head):
    q, k, v, q_pos, kv_pos, head_pos = decode_case(seed=6)
    positions = head_pos if per_head else kv_pos
    out, mass = ops.cache_attention(q, k, v, None, None, q_pos, positions, window, sinks, SCALE, 0, DIM, True)
    mask = loop_mask(q_pos, positions, window, sinks)
    torch.testing.assert_close(out, dense(q, k, v, mask), rtol=1e-5, atol=1e-5)
    scores = q @ k.repeat_interleave(3, 1).transpose(-1, -2) * SCALE
    weights = torch.softmax(scores.masked_fill(~mask, -torch.inf), -1).nan_to_num(0.0)
    expected = weights.reshape(2, KV_HEADS, 3, 2, 45).sum((2, 3))
    torch.testing.assert_close(mass, expected, rtol=1e-5, atol=1e-5)
    _, none = ops.cache_attention(q, k, v, None, None, q_pos, positions, window, sinks, SCALE, 0, DIM, False)
    assert none.numel() == 0


@pytest.mark.parametrize("bits,group_size", [(8, 32), (8, 8), (4, 32), (4, 8)])
def test_cache_attention_over_codes_equals_attention_over_their_values(bits, group_size):
    q, k, v, q_pos, kv_pos, _ = decode_case(seed=7)
    (kc, kp), (vc, vp) = ops.quantize_kv(k, bits, group_size), ops.quantize_kv(v, bits, group_size)
    out, mass = ops.cache_attention(q, kc, vc, kp, vp, q_pos, kv_pos, [16], [4], SCALE, bits, group_size, True)
    kd = ops.dequantize_kv(kc, kp, bits, group_size, torch.float32)
    vd = ops.dequantize_kv(vc, vp, bits, group_size, torch.float32)
    ref, ref_mass = ops.cache_attention(q, kd, vd, None, None, q_pos, kv_pos, [16], [4], SCALE, 0, DIM, True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mass, ref_mass, rtol=1e-5, atol=1e-5)


def python_quantize(values: list[float], bits: int) -> tuple[list[int], float, float]:
    """One group's codes, scale and low end, from the ops' description."""
    if bits == 8:
        scale = max(abs(x) for x in values) / 127
        return [max(-127, min(127, round(x / scale))) for x in values], scale, 0.0
    low, high = min(values), max(values)
    scale = (high - low) / 15
    return [max(0, min(15, round((x - low) / scale))) for x in values], scale, low


@pytest.mark.parametrize("bits,group_size", [(8, 32), (8, 8), (4, 32), (4, 8)])
def test_quantized_codes_follow_the_description_and_pack_two_per_byte(bits, group_size):
    x = torch.randn(2, 2, 3, DIM, generator=seeded(8))
    codes, params = ops.quantize_kv(x, bits, group_size)
    assert codes.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert codes.shape == (2, 2, 3, DIM if bits == 8 else DIM // 2)
    assert params.shape == (2, 2, 3, DIM // group_size, 1 if bits == 8 else 2)
    row, row_codes = x[1, 0, 2].tolist(), codes[1, 0, 2].tolist()
    for g in range(DIM // group_size):
        expected, scale, low = python_quantize(row[g * group_size:(g + 1) * group_size], bits)
        if bits == 8:
            got = row_codes[g * group_size:(g + 1) * group_size]
        else:  # the even channel in the low nibble
            packed = row_codes[g * group_size // 2:(g + 1) * group_size // 2]
            got = [c for byte in packed for c in (byte & 15, byte >> 4)]
        assert got == expected
        assert params[1, 0, 2, g, 0].item() == pytest.approx(scale, rel=1e-6)
        if bits == 4:
            assert params[1, 0, 2, g, 1].item() == pytest.approx(low, rel=1e-6)
    back = ops.dequantize_kv(codes, params, bits, group_size, torch.float32)
    # rounding to the nearest level: at most half a step from the value
    step = params[..., :1].expand(*params.shape[:-1], group_size).reshape(x.shape)
    assert bool(((back - x).abs() <= step / 2 + 1e-6).all())


def test_a_group_of_zeros_decodes_to_zeros_and_bad_layouts_are_refused():
    for bits in (8, 4):
        codes, params = ops.quantize_kv(torch.zeros(1, 8), bits, 8)
        assert bool((ops.dequantize_kv(codes, params, bits, 8, torch.float32) == 0).all())
    with pytest.raises(ValueError, match="divide the head dimension"):
        quantize_kv_reference(torch.zeros(1, 32), 8, 12)
    with pytest.raises(ValueError, match="bits 8 or 4"):
        quantize_kv_reference(torch.zeros(1, 32), 2, 8)
    with pytest.raises(ValueError, match="even"):
        quantize_kv_reference(torch.zeros(1, 30), 4, 3)


def test_fakes_give_the_shapes_of_the_references():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v, q_pos, kv_pos = prefill_case(2, 37, [0, 2], seed=9)
    with FakeTensorMode(allow_non_fake_inputs=True):
        table = ops.estimate_attention_blocks(q, k, q_pos, kv_pos, 16, 0.5, 0.0, 4, 1, SCALE)
        out = ops.sparse_attention(q, k, v, q_pos, kv_pos, [16], [4], table, 16, SCALE)
        codes, params = ops.quantize_kv(k, 4, 8)
        cached, mass = ops.cache_attention(q, codes, codes, params, params, q_pos, kv_pos, [0], [0], SCALE, 4, 8,
                                           True)
    assert table.shape == (2, HEADS, 3, 3) and out.shape == q.shape
    assert codes.shape == (2, KV_HEADS, 37, DIM // 2) and params.shape == (2, KV_HEADS, 37, DIM // 8, 2)
    assert cached.shape == q.shape and mass.shape == (2, KV_HEADS, 37)
