"""The block-sparse prefill and the decode attention Triton kernels against their ops' references, in
the interpreter.

``TRITON_INTERPRET`` is set before the kernel modules are imported, since ``triton.jit`` reads it
then. Both kernels sum the same float32 products as the references in another order (blocks,
chunks, an online softmax), hence 1e-5 for float32 inputs; bfloat16 inputs are rounded once at the
output. Shapes: ragged lengths (not multiples of the blocks), left-padded rows, grouped-query
attention, head dimensions that are not powers of two, per-head windows and per-KV-head slots.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from bevel.codegen.kernels.decode_attention import triton_cache_attention
from bevel.codegen.kernels.sparse_attention import triton_sparse_attention
from bevel.runtime.ops.attention_blocks import estimate_blocks_reference
from bevel.runtime.ops.cache_attention import cache_attention_reference
from bevel.runtime.ops.kv_quant import quantize_kv_reference
from bevel.runtime.ops.sparse_attention import sparse_attention_reference
from tests.models_zoo import seeded


def prefill_case(batch, heads, kv_heads, tokens, dim, pads, seed):
    g = seeded(seed)
    q = torch.randn(batch, heads, tokens, dim, generator=g)
    k, v = (torch.randn(batch, kv_heads, tokens, dim, generator=g) for _ in range(2))
    slots = torch.arange(tokens)[None]
    pad = torch.tensor(pads)[:, None]
    return q, k, v, (slots - pad).clamp(min=0), torch.where(slots >= pad, slots - pad, -1)


@pytest.mark.parametrize("heads,kv_heads,tokens,dim,pads,window,sinks,block", [
    (6, 2, 70, 32, [0, 9], [16], [4], 16),                               # GQA, ragged, window with sinks
    (4, 4, 45, 24, [5], [0], [0], 32),                                   # full causal, head dim 24
    (6, 2, 83, 32, [0, 30], [8, 0, 16, 4, 0, 30], [2, 0, 1, 0, 0, 3], 16),  # per-head patterns
    # windows at the edges of whole key blocks (interior blocks skip the position rule): a query
    # block's last query sees exactly the first key of the block a window of 32 reaches, not 31's
    (4, 2, 96, 16, [0, 0], [31, 32, 33, 48], [0, 0, 2, 0], 16),
])
def test_block_sparse_kernel_matches_reference(heads, kv_heads, tokens, dim, pads, window, sinks, block):
    q, k, v, q_pos, kv_pos = prefill_case(len(pads), heads, kv_heads, tokens, dim, pads, seed=tokens)
    scale = dim ** -0.5
    got = triton_sparse_attention(q, k, v, q_pos, kv_pos, window, sinks, None, block, scale)
    ref = sparse_attention_reference(q, k, v, q_pos, kv_pos, window, sinks, None, block, scale)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_block_sparse_kernel_follows_an_estimated_table_and_float16():
    q, k, v, q_pos, kv_pos = prefill_case(2, 6, 2, 100, 32, [0, 13], seed=11)
    table = estimate_blocks_reference(q, k, q_pos, kv_pos, 16, 0.4, 0.0, 4, 1, 32 ** -0.5)
    got = triton_sparse_attention(q, k, v, q_pos, kv_pos, [0], [0], table, 16, 32 ** -0.5)
    ref = sparse_attention_reference(q, k, v, q_pos, kv_pos, [0], [0], table, 16, 32 ** -0.5)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # half precision: float16, since the interpreter's tl.dot does not compute bfloat16 products
    # (a plain 16x16 bfloat16 tl.dot is off by 1e10 there; on a GPU the kernel runs them natively)
    low = [x.half() for x in (q, k, v)]
    got = triton_sparse_attention(*low, q_pos, kv_pos, [16], [4], None, 16, 32 ** -0.5)
    ref = sparse_attention_reference(*(x.float() for x in low), q_pos, kv_pos, [16], [4], None, 16, 32 ** -0.5)
    assert got.dtype == torch.float16
    # the weights enter the second product in float16 (about 5e-4 relative each), the output is rounded once
    torch.testing.assert_close(got.float(), ref, rtol=2e-3, atol=2e-3)


def decode_case(seed, per_head=False):
    g = seeded(seed)
    q = torch.randn(2, 6, 2, 32, generator=g)
    k, v = (torch.randn(2, 2, 150, 32, generator=g) for _ in range(2))
    if per_head:
        kv_pos = torch.stack([torch.stack([torch.randperm(200, generator=g)[:150] for _ in range(2)])
                              for _ in range(2)])
    else:
        kv_pos = torch.stack([torch.randperm(150, generator=g) for _ in range(2)])
        kv_pos[1, :9] = -1
    return q, k, v, torch.tensor([[150, 151], [120, 121]]), kv_pos


@pytest.mark.parametrize("bits,group_size", [(0, 32), (8, 32), (8, 8), (4, 16)])
@pytest.mark.parametrize("window,sinks,per_head,splits", [
    ([0], [0], False, 3),
    ([16], [4], False, 1),
    ([8, 0, 16, 4, 0, 30], [2, 0, 1, 0, 0, 3], True, 2),
])
def test_decode_kernel_matches_reference(bits, group_size, window, sinks, per_head, splits):
    q, k, v, q_pos, kv_pos = decode_case(seed=bits + splits, per_head=per_head)
    kp = vp = None
    if bits:
        (k, kp), (v, vp) = quantize_kv_reference(k, bits, group_size), quantize_kv_reference(v, bits, group_size)
    scale = 32 ** -0.5
    out, mass = triton_cache_attention(q, k, v, kp, vp, q_pos, kv_pos, window, sinks, scale, bits, group_size, True,
                                       splits=splits)
    ref, ref_mass = cache_attention_reference(q, k, v, kp, vp, q_pos, kv_pos, window, sinks, scale, bits, group_size,
                                              True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mass, ref_mass, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,group_size", [(8, 48), (8, 16), (4, 48), (4, 16)])
def test_decode_kernel_head_dim_below_its_tile(bits, group_size):
    """A head dimension of 48 in the kernel's 64-channel tile: groups of 16 are read once per group
    (the tile's fourth group is masked), a group of 48 does not divide the tile and takes the
    per-channel reading."""
    g = seeded(50 + bits + group_size)
    q = torch.randn(1, 4, 1, 48, generator=g)
    k, v = (torch.randn(1, 2, 70, 48, generator=g) for _ in range(2))
    q_pos, kv_pos = torch.tensor([[70]]), torch.arange(70)[None]
    (k, kp), (v, vp) = quantize_kv_reference(k, bits, group_size), quantize_kv_reference(v, bits, group_size)
    scale = 48 ** -0.5
    out, mass = triton_cache_attention(q, k, v, kp, vp, q_pos, kv_pos, [0], [0], scale, bits, group_size, True)
    ref, ref_mass = cache_attention_reference(q, k, v, kp, vp, q_pos, kv_pos, [0], [0], scale, bits, group_size, True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mass, ref_mass, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,group_size", [(0, 32), (8, 32), (4, 16)])
def test_decode_kernel_query_tiles_and_float16(bits, group_size):
    """80 query rows read each KV head (8 heads of a group x 10 queries): two tiles of the kernel's
    64 rows, both adding into the slots' mass. Then float16: keys and values are rounded to float16
    after dequantizing, and so are the softmax weights (about 5e-4 relative each), the output once."""
    g = seeded(40 + bits)
    q = torch.randn(1, 8, 10, 32, generator=g)
    k, v = (torch.randn(1, 1, 90, 32, generator=g) for _ in range(2))
    q_pos = torch.arange(80, 90)[None]
    kv_pos = torch.randperm(90, generator=g)[None]
    scale = 32 ** -0.5
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
        kp = vp = None
        if bits:
            kd, kp = quantize_kv_reference(kd, bits, group_size)
            vd, vp = quantize_kv_reference(vd, bits, group_size)
        out, mass = triton_cache_attention(qd, kd, vd, kp, vp, q_pos, kv_pos, [12], [3], scale, bits, group_size, True)
        ref, ref_mass = cache_attention_reference(qd, kd, vd, kp, vp, q_pos, kv_pos, [12], [3], scale, bits,
                                                  group_size, True)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref.float(), rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(mass, ref_mass, rtol=tolerance, atol=tolerance)
