"""Tests for the ONNX translations of the token merging ops: exported with one batch and token count,
run in onnxruntime on others, with padding rows, protected tokens and an r above half the tokens;
the plans (``dest``) must equal the torch ops' exactly and the merged tokens be within float rounding."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

import bevel
from tests.models_zoo import seeded

ops = torch.ops.bevel
CHANNELS = 16


class MergeSteps(nn.Module):
    """One merge step per (r, protect) on the same input, each merged then spread back; and a second
    step after the first, whose token count is the first's output length."""

    STEPS = [(3, 1), (100, 0)]  # (r, protect); 100 is clamped to half the free tokens

    def forward(self, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = []
        for r, protect in self.STEPS:
            dest = ops.bipartite_match(x, size, r, protect)
            merged, merged_size = ops.merge_tokens(x, size, dest, r, protect)
            outputs += [dest, merged, merged_size, ops.unmerge_tokens(merged, dest)]
        merged, merged_size = outputs[1], outputs[2]  # the first step's
        again = ops.bipartite_match(merged, merged_size, 2, 1)
        outputs += [again, *ops.merge_tokens(merged, merged_size, again, 2, 1)]
        return tuple(outputs)


class DropPadding(nn.Module):
    def forward(self, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dropped, dropped_size, dest = ops.drop_padding(x, size)
        return dropped, dropped_size, dest, ops.unmerge_tokens(dropped, dest)


def inputs(batch: int, tokens: int, real: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens and sizes (1 to 3), with the tokens of each row after ``real[b]`` padding (size 0)."""
    generator = seeded(seed)
    x = torch.randn(batch, tokens, CHANNELS, generator=generator)
    size = torch.randint(1, 4, (batch, tokens), generator=generator).float()
    size[torch.arange(tokens) >= torch.tensor(real)[:, None]] = 0.0
    return x, size


def export(module: nn.Module, example: tuple[torch.Tensor, ...], path: str) -> str:
    compiled = bevel.compile(module.eval(), passes="cleanup", example_inputs=example)
    return compiled.export_onnx(path)


def run_onnx(path: str, *args: torch.Tensor) -> list[np.ndarray]:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {spec.name: arg.numpy() for spec, arg in zip(session.get_inputs(), args)})


def assert_matches(got: list[np.ndarray], expected: tuple[torch.Tensor, ...]) -> None:
    """Integer outputs (plans) equal, float ones (tokens, sizes) within float32 rounding."""
    assert len(got) == len(expected)
    for i, (value, reference) in enumerate(zip(got, expected)):
        reference = reference.numpy()
        assert value.shape == reference.shape and value.dtype == reference.dtype, (i, value.shape, reference.shape)
        if reference.dtype == np.int64:
            np.testing.assert_array_equal(value, reference, err_msg=f"output {i}")
        else:
            np.testing.assert_allclose(value, reference, rtol=1e-5, atol=1e-5, err_msg=f"output {i}")


def test_merge_steps_match_the_ops_on_other_shapes(tmp_path):
    module = MergeSteps()
    path = export(module, inputs(2, 9, [9, 6], seed=1), str(tmp_path / "merge.onnx"))
    cases = [
        (3, 13, [13, 10, 4], 2),  # padding at the end of two rows, one mostly padding
        (1, 6, [6], 3),  # few tokens: r=3 clamps to 2 with one protected token
        (4, 20, [20, 1, 0, 17], 4),  # a row of padding only, a row of one real token
        (2, 3, [3, 2], 5),  # r clamps to 1 and to 0 in the second step
    ]
    for batch, tokens, real, seed in cases:
        x, size = inputs(batch, tokens, real, seed)
        with torch.no_grad():
            expected = module(x, size)
        assert_matches(run_onnx(path, x, size), expected)


def test_drop_padding_matches_the_op_on_other_shapes(tmp_path):
    module = DropPadding()
    path = export(module, inputs(2, 7, [7, 3], seed=1), str(tmp_path / "drop.onnx"))
    cases = [
        (3, 11, [5, 11, 2], 2),
        (2, 5, [0, 3], 3),  # a row of padding only
        (2, 4, [0, 0], 4),  # only padding: one slot kept
        (1, 6, [6], 5),  # no padding
    ]
    for batch, tokens, real, seed in cases:
        x, size = inputs(batch, tokens, real, seed)
        size[0, 0] = 0.0 if tokens > 1 else size[0, 0]  # padding before real tokens too
        with torch.no_grad():
            expected = module(x, size)
        assert_matches(run_onnx(path, x, size), expected)
