"""``bevel::int8_embedding``: an embedding table stored as int8 with one scale per row.

``out = qweight[indices] * scale[indices, None]`` (float32). The quantize passes use it for the
token and position tables, which in an encoder like MiniLM hold half of all weights. CPU: a
gather then a multiply (already only touches the rows used); CUDA: a Triton gather kernel;
ONNX: ``Gather`` of codes and scales, then ``Mul``.
"""

from __future__ import annotations

import torch


def int8_embedding_reference(qweight: torch.Tensor, scale: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The op's meaning in plain torch."""
    return qweight[indices].float() * scale.float()[indices].unsqueeze(-1)


@torch.library.custom_op("bevel::int8_embedding", mutates_args=())
def int8_embedding(qweight: torch.Tensor, scale: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows ``indices`` of an int8 [V, D] table with float32 row scales [V], as float32."""
    return int8_embedding_reference(qweight, scale, indices)


@int8_embedding.register_fake
def _(qweight, scale, indices):
    return scale.new_empty((*indices.shape, qweight.shape[1]), dtype=torch.float32)


@int8_embedding.register_kernel("cuda")
def _(qweight, scale, indices):
    from bevel.codegen.kernels.embedding import triton_int8_embedding

    return triton_int8_embedding(qweight, scale, indices)
