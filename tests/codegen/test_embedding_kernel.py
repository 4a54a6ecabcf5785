"""The int8 and int4 embedding gathers' Triton kernels against their ops' references, in the interpreter.

``TRITON_INTERPRET`` is set before the kernel module is imported, since ``triton.jit`` reads it then
(see test_quantized_linear_kernels). The kernel does the reference's one float32 multiply per
element on the same int8 code and row scale, so results must be equal, not merely close; the int4
kernel likewise (see test_int4_embedding_matches_reference).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from bevel.codegen.kernels.embedding import triton_int4_embedding, triton_int8_embedding
from bevel.runtime.ops.int4_embedding import int4_embedding_reference
from bevel.runtime.ops.int8_embedding import int8_embedding_reference
from bevel.runtime.ops.quant_format import quantize_int4_groups, quantize_int8_per_channel

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


def _int4_table(dim: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    weight = torch.randn(VOCAB, dim, generator=torch.Generator().manual_seed(dim + group_size))
    return quantize_int4_groups(weight, group_size)


def _no_fallback(monkeypatch):
    """Make the wrapper's fallback to the reference fail, so a passing test is the kernel's."""
    def fallback(*args):
        raise AssertionError("triton_int4_embedding fell back to the reference")
    monkeypatch.setattr("bevel.runtime.ops.int4_embedding.int4_embedding_reference", fallback)


# a row holds whole groups; 96 is no power of two, so its 128-wide column block is masked
@pytest.mark.parametrize(("dim", "group_size"), [(96, 32), (128, 32), (128, 64), (192, 64)])
@pytest.mark.parametrize("shape", [(9,), (3, 6)])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_int4_embedding_matches_reference(shape, dim, group_size, index_dtype, monkeypatch):
    """Equal, not close: the kernel unpacks the same nibbles and does the reference's float32 ops on
    them, (q - zero) exact for 4-bit integers, then one rounding in the multiply by the group's scale."""
    qweight, scale, zero = _int4_table(dim, group_size)
    _no_fallback(monkeypatch)
    indices = torch.randint(-VOCAB, VOCAB, shape, generator=torch.Generator().manual_seed(2))  # negatives too
    indices.view(-1)[:3] = torch.tensor([4, 4, 4 - VOCAB])  # one row looked up three times, once from the end
    out = triton_int4_embedding(qweight, scale, zero, group_size, indices.to(index_dtype))
    ref = int4_embedding_reference(qweight, scale, zero, group_size, indices)
    assert out.dtype == torch.float32 and out.shape == (*shape, dim)
    assert torch.equal(out, ref)
    assert torch.equal(out.view(-1, dim)[0], out.view(-1, dim)[2])


@pytest.mark.parametrize("group_size", [16, 128])
def test_int4_embedding_other_group_sizes_and_wide_rows(group_size, monkeypatch):
    qweight, scale, zero = _int4_table(1152, group_size)  # spans two 1024-wide column blocks
    _no_fallback(monkeypatch)
    indices = torch.tensor([[0, VOCAB - 1, 7], [7, -1, 3]])
    out = triton_int4_embedding(qweight, scale, zero, group_size, indices)
    assert torch.equal(out, int4_embedding_reference(qweight, scale, zero, group_size, indices))


def test_int4_embedding_of_no_indices_and_of_a_scalar_index():
    qweight, scale, zero = _int4_table(64, 32)
    assert triton_int4_embedding(qweight, scale, zero, 32, torch.empty(0, 4, dtype=torch.long)).shape == (0, 4, 64)
    index = torch.tensor(3)
    assert torch.equal(triton_int4_embedding(qweight, scale, zero, 32, index),
                       int4_embedding_reference(qweight, scale, zero, 32, index))


def test_int4_embedding_out_of_range_indices_read_nothing_outside_the_table():
    qweight, scale, zero = _int4_table(64, 32)
    out = triton_int4_embedding(qweight, scale, zero, 32, torch.tensor([1, VOCAB, -VOCAB - 1, 2]))
    assert torch.equal(out[[0, 3]], int4_embedding_reference(qweight, scale, zero, 32, torch.tensor([1, 2])))
    assert torch.equal(out[1:3], torch.zeros(2, 64))


def test_int4_embedding_leaves_other_formats_to_the_reference():
    """Signed codes are not the format the kernel unpacks; the reference's meaning still holds."""
    qweight, scale, zero = _int4_table(64, 32)
    signed = qweight.view(torch.int8)
    indices = torch.tensor([0, 5, 5])
    assert torch.equal(triton_int4_embedding(signed, scale, zero, 32, indices),
                       int4_embedding_reference(signed, scale, zero, 32, indices))
