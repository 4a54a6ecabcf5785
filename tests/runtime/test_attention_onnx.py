"""The ONNX translations of the attention and KV-cache ops: a module using each of them is exported with
one batch and length, then run in onnxruntime on others (ragged lengths, left padding, a prompt
shorter than a block) and compared with the torch ops: tables and codes exactly, float outputs
within float32 rounding (the same products summed in another order)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

import bevel
from tests.models_zoo import seeded

ops = torch.ops.bevel


class AttentionOps(nn.Module):
    """Every op of the family, with windows, per-head patterns, both table estimates, both bit widths."""

    def forward(self, q, k, v, q_pos, kv_pos):
        full = ops.sparse_attention(q, k, v, q_pos, kv_pos, [0], [0], None, 16, 0.2)
        per_head = ops.sparse_attention(q, k, v, q_pos, kv_pos, [8, 0, 16, 4, 0, 30], [2, 0, 1, 0, 0, 3], None, 16,
                                        0.2)
        by_density = ops.estimate_attention_blocks(q, k, q_pos, kv_pos, 16, 0.4, 0.0, 4, 1, 0.2)
        by_threshold = ops.estimate_attention_blocks(q, k, q_pos, kv_pos, 16, 0.0, 0.6, 4, 0, 0.2)
        estimated = ops.sparse_attention(q, k, v, q_pos, kv_pos, [0], [0], by_density, 16, 0.2)
        k8, k8_params = ops.quantize_kv(k, 8, 8)
        v4, v4_params = ops.quantize_kv(v, 4, 16)
        k_back = ops.dequantize_kv(k8, k8_params, 8, 8, torch.float32)
        windowed, mass = ops.cache_attention(q, k, v, None, None, q_pos, kv_pos, [16], [4], 0.2, 0, 32, True)
        over_int8, _ = ops.cache_attention(q, k8, k8, k8_params, k8_params, q_pos, kv_pos, [0], [0], 0.2, 8, 8, False)
        over_int4, _ = ops.cache_attention(q, v4, v4, v4_params, v4_params, q_pos, kv_pos, [0], [0], 0.2, 4, 16, False)
        return (full, per_head, by_density, by_threshold, estimated, k8, k8_params, v4, v4_params, k_back, windowed,
                mass, over_int8, over_int4)


def case(batch: int, tokens: int, pads: list[int], seed: int) -> tuple[torch.Tensor, ...]:
    g = seeded(seed)
    q = torch.randn(batch, 6, tokens, 32, generator=g)
    k, v = (torch.randn(batch, 2, tokens, 32, generator=g) for _ in range(2))
    slots, pad = torch.arange(tokens)[None], torch.tensor(pads)[:, None]
    return q, k, v, (slots - pad).clamp(min=0), torch.where(slots >= pad, slots - pad, -1)


def test_attention_ops_in_onnxruntime_equal_the_torch_ops(tmp_path):
    compiled = bevel.compile(AttentionOps().eval(), passes="cleanup", example_inputs=case(2, 40, [0, 5], seed=0))
    path = compiled.export_onnx(str(tmp_path / "attention.onnx"))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for inputs in (case(3, 70, [0, 9, 30], seed=1), case(1, 10, [0], seed=2)):
        got = session.run(None, {spec.name: x.numpy() for spec, x in zip(session.get_inputs(), inputs)})
        expected = AttentionOps()(*inputs)
        assert len(got) == len(expected)
        for index, (value, reference) in enumerate(zip(got, expected)):
            reference = reference.numpy()
            assert value.shape == reference.shape and value.dtype == reference.dtype, index
            if reference.dtype.kind in "iu":  # tables and codes
                np.testing.assert_array_equal(value, reference, err_msg=f"output {index}")
            else:  # masses sum up to 12 weights each: relative rounding
                np.testing.assert_allclose(value, reference, rtol=1e-5, atol=1e-5, err_msg=f"output {index}")
