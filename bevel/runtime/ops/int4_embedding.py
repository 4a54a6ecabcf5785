"""``bevel::int4_embedding``: an embedding table stored in 4-bit groups along each row.

The table uses the int4 group format of ``quant_format`` with rows as output channels: ``qweight``
uint8 [V, D // 2], ``scale`` float16 [V, D // group_size], ``zero`` uint8 [V, ceil(groups / 2)];
``out = dequantize(rows indices)`` as float32 [*indices.shape, D]. CPU: gather the rows, then
dequantize only those; CUDA: a Triton gather kernel; ONNX: ``Gather`` of the packed rows, their
scales and zero points, unpacked with integer ops.
"""

from __future__ import annotations

import torch

from bevel.runtime.ops.quant_format import dequantize_int4_groups


def int4_embedding_reference(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                             indices: torch.Tensor) -> torch.Tensor:
    """The op's meaning in plain torch."""
    flat = indices.reshape(-1)
    rows = dequantize_int4_groups(qweight[flat], scale[flat], zero[flat], group_size)
    return rows.reshape(*indices.shape, rows.shape[-1])


@torch.library.custom_op("bevel::int4_embedding", mutates_args=())
def int4_embedding(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                   indices: torch.Tensor) -> torch.Tensor:
    """Rows ``indices`` of a 4-bit [V, D] table, as float32."""
    return int4_embedding_reference(qweight, scale, zero, group_size, indices)


@int4_embedding.register_fake
def _(qweight, scale, zero, group_size, indices):
    return scale.new_empty((*indices.shape, scale.shape[1] * group_size), dtype=torch.float32)


@int4_embedding.register_kernel("cuda")
def _(qweight, scale, zero, group_size, indices):
    from bevel.codegen.kernels.embedding import triton_int4_embedding

    return triton_int4_embedding(qweight, scale, zero, group_size, indices)
