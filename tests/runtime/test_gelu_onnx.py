"""The ONNX translation of exact ``gelu`` (``runtime/ops/gelu_onnx.py``) against PyTorch in
onnxruntime, and onnxruntime's fusion of it (with the Linear's bias before it) into one kernel; the
tanh approximation keeps the exporter's translation.

Both sides compute in float32; erf's implementations differ by a few ulps, and the two Linears sum
16 and 32 products of O(1): 1e-5 leaves room without hiding a wrong constant (a GELU with 0.5
misplaced or sqrt 2 as 2 is off by 0.1 and more).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import bevel
from tests.models_zoo import seeded


def feed_forward(approximate: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(approximate=approximate), nn.Linear(32, 16)).eval()


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_exports_and_matches_pytorch_in_onnxruntime(approximate, tmp_path):
    model = feed_forward(approximate)
    compiled = bevel.compile(model, "cleanup", example_inputs=(torch.randn(2, 5, 16),))
    path = compiled.export_onnx(str(tmp_path / "ffn.onnx"))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    x = torch.randn(3, 7, 16, generator=seeded(1)) * 3  # values well into both tails of erf
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-5, atol=1e-5)
    fused = {node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    if approximate == "none":  # the whole activation, the bias add before it too, in one kernel
        assert "BiasGelu" in fused and not fused & {"Erf", "Div"}, fused
