"""The int8 embedding gather's Triton kernel against ``int8_embedding_reference``, in the interpreter.

``TRITON_INTERPRET`` is set before the kernel module is imported, since ``triton.jit`` reads it then
(see test_quantized_linear_kernels). The kernel does the reference's one float32 multiply per
element on the same int8 code and row scale, so results must be equal, not merely close.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from bevel.codegen.kernels.embedding import triton_int8_embedding
from bevel.runtime.ops.int8_embedding import int8_embedding_reference
from bevel.runtime.ops.quant_format import quantize_int8_per_channel

VOCAB = 50


def _table(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.randn(VOCAB, dim, generator=torch.Generator().manual_seed(dim))
    return quantize_int8_per_channel(weight)


@pytest.mark.parametrize("dim", [37, 1030])  # ragged; 1030 spans two 1024-wide column blocks
@pytest.mark.parametrize("shape", [(5,), (3, 7), (2, 3, 4)])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_int8_embedding_matches_reference(shape, dim, index_dtype):
    qweight, scale = _table(dim)
    indices = torch.randint(-VOCAB, VOCAB, shape, generator=torch.Generator().manual_seed(1))  # negatives too
    out = triton_int8_embedding(qweight, scale, indices.to(index_dtype))
    ref = int8_embedding_reference(qweight, scale, indices)
    assert out.dtype == torch.float32 and out.shape == (*shape, dim)
    assert torch.equal(out, ref)


def test_int8_embedding_of_no_indices_and_of_a_scalar_index():
    qweight, scale = _table(8)
    assert triton_int8_embedding(qweight, scale, torch.empty(0, 4, dtype=torch.long)).shape == (0, 4, 8)
    index = torch.tensor(3)
    assert torch.equal(triton_int8_embedding(qweight, scale, index), int8_embedding_reference(qweight, scale, index))


def test_out_of_range_indices_read_nothing_outside_the_table():
    """The reference raises; a GPU kernel cannot without a sync, so such rows come out as zeros."""
    qweight, scale = _table(8)
    out = triton_int8_embedding(qweight, scale, torch.tensor([1, VOCAB, -VOCAB - 1, 2]))
    assert torch.equal(out[[0, 3]], int8_embedding_reference(qweight, scale, torch.tensor([1, 2])))
    assert torch.equal(out[1:3], torch.zeros(2, 8))
