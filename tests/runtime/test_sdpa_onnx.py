"""The ONNX translation of ``scaled_dot_product_attention`` (``runtime/ops/sdpa_onnx.py``) against
PyTorch in onnxruntime: no mask, a boolean mask with a query that sees no key (PyTorch gives it
zeros, here by a factor taken from the mask, with no NaN test), an additive float mask with a query
whose biases are all -inf (zeros too, its NaN zeroed in the output), and a causal
call, left to the exporter's own translation. The compile leaves every input dimension dynamic, the
head dimension too, so the default scale is computed at run time.

Both sides compute in float32 and differ only in the order of the sums of two matrix products and a
softmax over at most 12 keys of O(1) scores: a few ulps. 1e-5 leaves room without hiding a wrong op.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bevel
from tests.models_zoo import seeded


class Attention(nn.Module):
    def __init__(self, mask: str) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.mask == "none":
            return F.scaled_dot_product_attention(q, k, v)
        if self.mask == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.mask == "bool":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask > 0, scale=0.3)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.log())  # float: log of a weight, -inf at 0


def inputs(batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    """[B, 4 heads, 10 queries, 8], [B, 4, 12 keys, 8] x 2 and a key weight [B, 1, 10, 12] with zeros;
    the third query of the first row sees no key."""
    g = seeded(seed)
    q = torch.randn(batch, 4, 10, 8, generator=g)
    k, v = (torch.randn(batch, 4, 12, 8, generator=g) for _ in range(2))
    weight = torch.rand(batch, 1, 10, 12, generator=g) * (torch.rand(batch, 1, 10, 12, generator=g) > 0.3)
    weight[:, :, :, 0] = 1.0  # every query sees the first key ...
    weight[0, 0, 2] = 0.0  # ... but this one
    return q, k, v, weight


@pytest.mark.parametrize("mask", ["none", "bool", "float", "causal"])
def test_attention_exports_and_matches_pytorch_in_onnxruntime(mask, tmp_path):
    model = Attention(mask).eval()
    compiled = bevel.compile(model, "cleanup", example_inputs=inputs(2, seed=1))
    path = compiled.export_onnx(str(tmp_path / "attention.onnx"))
    fresh = inputs(3, seed=2)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {spec.name: x.numpy() for spec, x in zip(session.get_inputs(), fresh)}  # an unused mask is no input
    (got,) = session.run(None, feeds)
    with torch.no_grad():
        expected = model(*fresh).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    ops = [node.op_type for node in onnx.load(path, load_external_data=False).graph.node]
    if mask in ("bool", "float"):
        assert not np.isnan(got).any() and (got[0, :, 2] == 0).all()  # the query that sees nothing
    if mask == "bool":  # a finite bias: no NaN to look for, the output times whether a query sees any key
        assert "IsNaN" not in ops and ops[-1] == "Mul"
    if mask == "float":  # the NaN of such a query are zeroed once, in the output, not in the [B, H, T, L] weights
        assert ops.count("IsNaN") == 1 and ops.index("IsNaN") > ops.index("Softmax")


def test_logits_far_below_their_row_maximum_keep_their_weights_below_float32_resolution(tmp_path):
    """Logits spread over ~+-300 (queries and keys scaled up), with a mask: the translation raises
    logits more than 80 below their row's maximum to that floor (onnxruntime's softmax is slow on
    denormal exponentials), which must leave the output as PyTorch computes it."""
    model = Attention("bool").eval()
    q, k, v, weight = inputs(2, seed=3)
    compiled = bevel.compile(model, "cleanup", example_inputs=(q, k, v, weight))
    session = ort.InferenceSession(compiled.export_onnx(str(tmp_path / "attention.onnx")),
                                   providers=["CPUExecutionProvider"])
    q, k = q * 12, k * 12  # scale 0.3: logits of O(300)
    (got,) = session.run(None, {spec.name: x.numpy() for spec, x in zip(session.get_inputs(), (q, k, v, weight))})
    with torch.no_grad():
        expected = model(q, k, v, weight).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
