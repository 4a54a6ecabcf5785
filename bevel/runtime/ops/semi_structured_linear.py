"""``bevel::semi_structured_linear``: a linear whose weight is 2:4 sparse, stored dense with its zeros.

``y = x @ weight.T + bias``. CPU: the dense linear it means (there is no CPU sparse kernel); CUDA:
PyTorch's cuSPARSELt GEMM on the weight compressed once to its layout; ONNX (``semi_structured_onnx``):
``MatMul`` of the transposed dense weight (ONNX has no sparse GEMM). Keeping the weight dense in the
graph is what lets the saved artifact and the ONNX export hold ordinary tensors. ``prune.nm`` inserts
the op only where it measured the sparse kernel faster.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from bevel.ir.analysis import matmul_flops, register_flops

# id(weight) -> (the weight's version when compressed, its cuSPARSELt form)
_compressed: dict[int, tuple[int, torch.Tensor]] = {}


@torch.library.custom_op("bevel::semi_structured_linear", mutates_args=())
def semi_structured_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] times a 2:4-sparse weight [N, K] stored dense with its zeros, plus an optional bias [N]."""
    return F.linear(x, weight, bias)


@semi_structured_linear.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@semi_structured_linear.register_kernel("cuda")
def _(x, weight, bias):
    rows = x.reshape(-1, x.shape[-1])
    out = F.linear(rows, _compressed_weight(weight), bias)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _compressed_weight(weight: torch.Tensor) -> torch.Tensor:
    """The cuSPARSELt form of ``weight``, made once and remade only if the weight was written to."""
    from torch.sparse import to_sparse_semi_structured

    cached = _compressed.get(id(weight))
    if cached is not None and cached[0] == weight._version:
        return cached[1]
    if id(weight) not in _compressed:
        weakref.finalize(weight, _compressed.pop, id(weight), None)
    _compressed[id(weight)] = (weight._version, to_sparse_semi_structured(weight.detach()))
    return _compressed[id(weight)][1]


register_flops(semi_structured_linear._opoverload, matmul_flops)
