"""The token matching and merging Triton kernels against their ops' references, in the interpreter.

``TRITON_INTERPRET`` is set before the kernel module is imported, since ``triton.jit`` reads it then.
The matching kernel computes the same float32 cosines as the reference but sums them in another
order, so random inputs (no two edges within rounding) must give the same plan exactly; the merge
adds the same float32 products in another order (atomic adds), hence a float32 rounding tolerance.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from bevel.codegen.kernels.token_merge import triton_bipartite_match, triton_merge_tokens
from bevel.runtime.ops.token_merge import bipartite_match_reference, merge_tokens_reference, merged_tokens


def case(batch: int, tokens: int, channels: int, seed: int, pads: int = 0):
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(batch, tokens, channels, generator=g)
    x = torch.randn(batch, tokens, channels + 3, generator=g)
    size = torch.randint(1, 4, (batch, tokens), generator=g).float()
    if pads:
        size[-1, tokens - pads:] = 0
    return metric, x, size


# ragged token counts (not multiples of the 32-row block), head dims 16 to 72, padding, protect 0-2;
# ViT-B's 197 tokens span four of the plan kernel's 64-token blocks; in the last case a row has
# fewer padding tokens (12) than it must remove (20), so real tokens go too
@pytest.mark.parametrize("batch,tokens,channels,r,protect,pads", [
    (2, 37, 16, 8, 1, 0),
    (3, 70, 72, 20, 2, 15),
    (1, 9, 24, 100, 0, 3),
    (2, 197, 64, 16, 1, 0),
    (2, 150, 32, 20, 1, 12),
])
def test_matching_kernel_matches_reference(batch, tokens, channels, r, protect, pads):
    metric, _, size = case(batch, tokens, channels, seed=tokens, pads=pads)
    got = triton_bipartite_match(metric, size, r, protect)
    assert torch.equal(got, bipartite_match_reference(metric, size, r, protect))


def test_matching_kernel_reads_bfloat16_metrics_and_zero_rows():
    """The kernel scales the rows to unit length itself, in float32: a bfloat16 metric gives the
    reference's plan on the same values, and an all-zero row (cosine 0 to everything) is no error."""
    metric, _, size = case(2, 45, 40, seed=3, pads=5)
    metric = metric.to(torch.bfloat16)
    metric[0, 7] = 0
    got = triton_bipartite_match(metric, size, 12, 1)
    assert torch.equal(got, bipartite_match_reference(metric, size, 12, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,tokens,channels,r,protect,pads", [
    (2, 37, 16, 8, 1, 0),
    (2, 70, 1030, 20, 1, 30),   # channels span two 1024-wide blocks; a row with padding slots
])
def test_merge_kernel_matches_reference(batch, tokens, channels, r, protect, pads, dtype):
    metric, x, size = case(batch, tokens, channels, seed=tokens + 1, pads=pads)
    x = x[..., :channels].to(dtype)
    dest = bipartite_match_reference(metric, size, r, protect)
    slots = int(merged_tokens(tokens, r, protect))
    out, total = triton_merge_tokens(x, size, dest, slots)
    ref, ref_total = merge_tokens_reference(x, size, dest, r, protect)
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(total, ref_total, rtol=0, atol=0)  # small integer sizes: exact
    tolerance = 1e-5 if dtype == torch.float32 else 8e-3  # bf16: one rounding of the output
    torch.testing.assert_close(out.float(), ref.float(), rtol=tolerance, atol=tolerance)


def test_matching_kernel_breaks_ties_toward_the_earlier_token():
    """Identical tokens: every A token's best cosine is the same, so the first ``r`` A tokens go, each
    to the first B token (the running maximum keeps the first of equal cosines)."""
    metric = torch.ones(1, 12, 8)
    size = torch.ones(1, 12)
    got = triton_bipartite_match(metric, size, 3, 1)
    # tokens 1, 3 and 5 (A) go into token 2 (the first B), which keeps slot 1
    assert got.tolist() == [[0, 1, 1, 1, 2, 1, 3, 4, 5, 6, 7, 8]]
