"""Tests for the ONNX translations of the quantized ops: each exported op runs in onnxruntime, matches its
reference on a fresh batch and sequence size, and keeps its weights int8/uint8 in the file."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import bevel
from bevel.runtime.ops.int4_embedding import int4_embedding_reference
from bevel.runtime.ops.int4_weight_linear import int4_weight_linear_reference
from bevel.runtime.ops.int8_dynamic_linear import int8_dynamic_linear_reference
from bevel.runtime.ops.int8_embedding import int8_embedding_reference
from bevel.runtime.ops.int8_weight_linear import int8_weight_linear_reference
from bevel.runtime.ops.quant_format import (
    INT8_MAX,
    quantize_int4_groups,
    quantize_int8_per_channel,
    quantize_per_token,
    unpack_int4,
)
from tests.models_zoo import seeded

# Big enough that the weights dominate the file (and that the exporter's optimizer, which folds
# only constants under 8192 elements, leaves the packed weights as they are).
N, K = 128, 256
# float32's unit roundoff
ROUNDOFF = 2.0**-24
FLOAT32_BYTES = 4


class Int8WeightLinear(nn.Module):
    def __init__(self, bias: bool, seed: int = 10) -> None:
        super().__init__()
        qweight, scale = quantize_int8_per_channel(torch.randn(N, K, generator=seeded(seed)))
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", torch.randn(N, generator=seeded(seed + 1)) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.bevel.int8_weight_linear(x, self.qweight, self.scale, self.bias)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return int8_weight_linear_reference(x, self.qweight, self.scale, self.bias)

    def weight_magnitude(self) -> torch.Tensor:
        return self.qweight.double().abs() * self.scale.double()[:, None]


class Int4WeightLinear(nn.Module):
    def __init__(self, group_size: int, bias: bool, in_features: int = K, seed: int = 20) -> None:
        super().__init__()
        weight = torch.randn(N, in_features, generator=seeded(seed))
        qweight, scale, zero = quantize_int4_groups(weight, group_size)
        self.group_size = group_size
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.register_buffer("bias", torch.randn(N, generator=seeded(seed + 1)) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.bevel.int4_weight_linear(x, self.qweight, self.scale, self.zero, self.group_size, self.bias)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return int4_weight_linear_reference(x, self.qweight, self.scale, self.zero, self.group_size, self.bias)

    def weight_magnitude(self) -> torch.Tensor:
        # (q + zero) * scale rather than |q - zero| * scale: a runtime may dequantize as
        # q * scale - zero * scale, rounding both products, not only their difference
        n, groups = self.scale.shape
        codes = unpack_int4(self.qweight, groups * self.group_size).double().reshape(n, groups, self.group_size)
        zeros = unpack_int4(self.zero, groups).double()[..., None]
        return ((codes + zeros) * self.scale.double()[..., None]).reshape(n, -1)


class Int8DynamicLinear(Int8WeightLinear):
    def __init__(self, bias: bool, smooth: bool, seed: int = 30, bits: int = 8) -> None:
        super().__init__(bias, seed)
        smoothing = torch.rand(K, generator=seeded(seed + 2)) + 0.5
        self.register_buffer("input_scale", smoothing if smooth else None)
        self.bits = bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.bevel.int8_dynamic_linear(x, self.qweight, self.scale, self.bias, self.input_scale, self.bits)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return int8_dynamic_linear_reference(x, self.qweight, self.scale, self.bias, self.input_scale, self.bits)


class Int8Embedding(nn.Module):
    def __init__(self, vocab: int = 1000, dim: int = 64) -> None:
        super().__init__()
        qweight, scale = quantize_int8_per_channel(torch.randn(vocab, dim, generator=seeded(40)))
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.ops.bevel.int8_embedding(self.qweight, self.scale, indices)


class Int4Embedding(nn.Module):
    def __init__(self, group_size: int, vocab: int = 300, dim: int = 128, seed: int = 50) -> None:
        super().__init__()
        qweight, scale, zero = quantize_int4_groups(torch.randn(vocab, dim, generator=seeded(seed)), group_size)
        self.group_size = group_size
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.ops.bevel.int4_embedding(self.qweight, self.scale, self.zero, self.group_size, indices)

    def reference(self, indices: torch.Tensor) -> torch.Tensor:
        return int4_embedding_reference(self.qweight, self.scale, self.zero, self.group_size, indices)


class SideBySide(nn.Module):
    """Variants of one op applied to the same input, one output each: one export (the slow part of
    these tests, ~2 s) covers them all."""

    def __init__(self, *variants: nn.Module) -> None:
        super().__init__()
        self.variants = nn.ModuleList(variants)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(variant(x) for variant in self.variants)


def export(module: nn.Module, example: torch.Tensor, path: str) -> str:
    compiled = bevel.compile(module.eval(), passes="cleanup", example_inputs=(example,))
    return compiled.export_onnx(path)


def run_onnx(path: str, x: torch.Tensor) -> list[np.ndarray]:
    # default session options: what a user of the file gets
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})


def load(path: str) -> onnx.ModelProto:
    return onnx.load(path, load_external_data=False)


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {tensor.name: tensor for tensor in model.graph.initializer}


def nodes(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type == op_type]


def attributes(node: onnx.NodeProto) -> dict[str, object]:
    return {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}


def weight_bytes(model: onnx.ModelProto) -> int:
    """The bytes the model's initializers take (in the file or beside it in ``.data``)."""
    return sum(int(np.prod(tensor.dims)) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
               for tensor in model.graph.initializer)


def assert_no_float_weight(model: onnx.ModelProto, numel: int) -> None:
    """No float initializer as large as a weight: none was dequantized into the file."""
    for tensor in model.graph.initializer:
        if tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            assert int(np.prod(tensor.dims)) < numel, (tensor.name, list(tensor.dims))


def float_rounding_bound(x: torch.Tensor, weight_magnitude: torch.Tensor, bias: torch.Tensor | None) -> np.ndarray:
    """How far two float32 linears on the same dequantized weight may be apart: summing K products in
    any order (blocked, with FMA or without) is off by at most about K roundoffs of sum |x_k w_k|, and
    the weight by a roundoff or two of the products it is dequantized from."""
    magnitude = x.double().abs() @ weight_magnitude.T
    if bias is not None:
        magnitude = magnitude + bias.double().abs()
    return ((x.shape[-1] + 4) * ROUNDOFF * magnitude).numpy()


# compiled with one batch and sequence size, run on another
EXAMPLE = torch.randn(2, 3, K, generator=seeded(1))
FRESH = torch.randn(3, 5, K, generator=seeded(2))


# -- int8 weight-only --------------------------------------------------------------------------------


def test_int8_weight_linear_is_qdq_and_matches(tmp_path):
    variants = [Int8WeightLinear(bias=True, seed=10), Int8WeightLinear(bias=False, seed=12)]
    path = export(SideBySide(*variants), EXAMPLE, str(tmp_path / "int8.onnx"))

    model = load(path)
    dequantizes = nodes(model, "DequantizeLinear")
    assert len(dequantizes) == 2 and len(nodes(model, "MatMul")) == 2 and len(nodes(model, "Add")) == 1
    for node in dequantizes:
        weight = initializers(model)[node.input[0]]
        assert weight.data_type == onnx.TensorProto.INT8 and list(weight.dims) == [N, K]
        assert attributes(node)["axis"] == 0  # one scale per output row
    assert_no_float_weight(model, N * K)
    assert weight_bytes(model) < 0.3 * 2 * N * K * FLOAT32_BYTES  # int8 codes, N scales and a bias

    for variant, got in zip(variants, run_onnx(path, FRESH)):
        expected = variant.reference(FRESH).numpy()
        assert got.shape == expected.shape == (3, 5, N)
        # the same dequantized weights on both sides; only the order of the float32 sums differs
        error = np.abs(got - expected)
        assert (error <= float_rounding_bound(FRESH, variant.weight_magnitude(), variant.bias)).all(), error.max()


# -- int4 weight-only --------------------------------------------------------------------------------

INT4_VARIANTS = [(32, True), (64, False)]  # (group size, bias)


@pytest.fixture(scope="module")
def int4_export(tmp_path_factory) -> tuple[list[Int4WeightLinear], str]:
    variants = [Int4WeightLinear(group, bias, seed=20 + 2 * i) for i, (group, bias) in enumerate(INT4_VARIANTS)]
    path = export(SideBySide(*variants), EXAMPLE, str(tmp_path_factory.mktemp("int4") / "int4.onnx"))
    return variants, path


def test_int4_weight_linear_is_matmul_nbits_and_matches(int4_export):
    variants, path = int4_export
    model = load(path)
    matmuls = nodes(model, "MatMulNBits")
    assert [attributes(node) for node in matmuls] == [
        {"K": K, "N": N, "bits": 4, "block_size": group, "accuracy_level": 0} for group, _ in INT4_VARIANTS]
    for node, (_, bias) in zip(matmuls, INT4_VARIANTS):
        assert node.domain == "com.microsoft"
        assert initializers(model)[node.input[3]].data_type == onnx.TensorProto.UINT8  # packed zero points
        assert (len(node.input) == 6 and node.input[5] and not node.input[4]) if bias else len(node.input) == 4
    packed = [t for t in model.graph.initializer
              if t.data_type == onnx.TensorProto.UINT8 and list(t.dims) == [N, K // 2]]
    assert len(packed) == 2
    assert_no_float_weight(model, N * K)
    # 4-bit codes, one float32 scale and half a byte of zero point per group, against float32
    assert weight_bytes(model) < 0.2 * 2 * N * K * FLOAT32_BYTES

    for variant, got in zip(variants, run_onnx(path, FRESH)):
        error = np.abs(got - variant.reference(FRESH).numpy())
        assert (error <= float_rounding_bound(FRESH, variant.weight_magnitude(), variant.bias)).all(), error.max()


def test_int4_weights_are_constants_to_onnxruntime(int4_export, tmp_path):
    # MatMulNBits prepacks B only when it is a constant. Above 8192 elements the exporter leaves the
    # Reshape of the [N, K/2] initializer to MatMulNBits' [N, groups, blob] in the file; onnxruntime's
    # constant folding must turn it into an initializer at load.
    _, path = int4_export
    assert len(nodes(load(path), "Reshape")) == 2
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    optimized = load(options.optimized_model_filepath)
    blob_shapes = {attributes(node)["block_size"]: list(initializers(optimized)[node.input[1]].dims)
                   for node in nodes(optimized, "MatMulNBits")}
    assert blob_shapes == {group: [N, K // group, group // 2] for group, _ in INT4_VARIANTS}


def test_int4_group_sizes_matmul_nbits_refuses_are_dequantized_in_the_graph(tmp_path):
    # MatMulNBits takes power-of-two blocks of 16 or more; a group of 24 is unpacked by plain ONNX ops
    in_features = 192
    module = Int4WeightLinear(24, bias=True, in_features=in_features)
    path = export(module, torch.randn(2, 3, in_features, generator=seeded(1)), str(tmp_path / "int4.onnx"))

    model = load(path)
    assert not nodes(model, "MatMulNBits")
    packed = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.UINT8 and t.dims[:1] == [N]]
    assert [list(t.dims) for t in packed] == [[N, in_features // 2]]
    assert_no_float_weight(model, N * in_features)

    x = torch.randn(3, 5, in_features, generator=seeded(2))
    (got,) = run_onnx(path, x)
    error = np.abs(got - module.reference(x).numpy())
    assert (error <= float_rounding_bound(x, module.weight_magnitude(), module.bias)).all(), error.max()


# -- int8 dynamic (W8A8) -----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 7])
def test_int8_dynamic_linear_is_matmul_integer_and_matches(tmp_path, bits):
    variants = [Int8DynamicLinear(bias=True, smooth=True, seed=30, bits=bits),
                Int8DynamicLinear(bias=False, smooth=False, seed=33, bits=bits)]
    path = export(SideBySide(*variants), EXAMPLE, str(tmp_path / "w8a8.onnx"))

    model = load(path)
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("MatMulInteger") == 2 and "MatMul" not in ops
    assert all(ops.count(op) == 2 for op in ("ReduceMax", "ReduceMin", "Clip", "ReduceSum"))
    assert ops.count("Round") == 4  # the zero point and the codes, per linear
    assert ops.count("Mul") == 7  # the smoothing, then the zero points' share and two rescales per linear
    for node in nodes(model, "MatMulInteger"):
        weight = initializers(model)[node.input[1]]
        assert weight.data_type == onnx.TensorProto.INT8 and list(weight.dims) == [K, N]  # the transpose folded
    assert_no_float_weight(model, N * K)
    assert weight_bytes(model) < 0.3 * 2 * N * K * FLOAT32_BYTES

    x = FRESH.clone()
    x[1, 2] = 0.0  # a token of zeros takes the smallest scale instead of dividing by zero
    for variant, got in zip(variants, run_onnx(path, x)):
        expected = variant.reference(x).numpy()
        # Both sides do the same float32 operations in the same order (ONNX Round is half to even like
        # torch.round, Div is IEEE) and the integer sums are exact, so they agree to a few roundoffs of
        # the output; measured: bit-identical. Should a runtime's division ever round a code the other
        # way on a .5 tie, that output moves by one code step, token_scale * |qweight[n, k]| * scale[n]
        # <= token_scale * 127 * scale[n] (the row's range / 255 times the row's largest weight, ~0.5% of
        # a typical output here): the bound allows one such step, where a wrong op misses by many.
        smoothed = x if variant.input_scale is None else x * variant.input_scale
        _, token_scale, _ = quantize_per_token(smoothed, bits)
        code_step = (token_scale.double() * (INT8_MAX * variant.scale.double())).numpy()
        bound = code_step + 8 * ROUNDOFF * np.abs(expected)
        error = np.abs(got - expected)
        assert (error <= bound).all(), (error / bound).max()
        bias = np.zeros(N, np.float32) if variant.bias is None else variant.bias.numpy()
        np.testing.assert_array_equal(got[1, 2], bias)


# -- int8 embedding ----------------------------------------------------------------------------------


def test_int8_embedding_with_2d_indices_matches_exactly(tmp_path):
    module = Int8Embedding(vocab=1000, dim=64)
    path = export(module, torch.randint(0, 1000, (2, 3), generator=seeded(1)), str(tmp_path / "embedding.onnx"))

    model = load(path)
    assert len(nodes(model, "Gather")) == 2 and len(nodes(model, "Mul")) == 1
    table = initializers(model)[nodes(model, "Gather")[0].input[0]]
    assert table.data_type == onnx.TensorProto.INT8 and list(table.dims) == [1000, 64]
    assert_no_float_weight(model, 1000 * 64)
    assert weight_bytes(model) < 0.3 * 1000 * 64 * FLOAT32_BYTES

    indices = torch.randint(0, 1000, (4, 7), generator=seeded(2))
    indices[0, 0], indices[3, 6] = 0, 999  # the first and the last rows
    (got,) = run_onnx(path, indices)
    assert got.shape == (4, 7, 64)
    # one product of the same int8 code and float32 scale on both sides: the same rounding, bit for bit
    np.testing.assert_array_equal(got, int8_embedding_reference(module.qweight, module.scale, indices).numpy())


# -- int4 embedding ----------------------------------------------------------------------------------


def test_int4_embedding_with_2d_indices_matches_exactly(tmp_path):
    vocab = 300
    # (group size, dim): 4 and 2 groups a row, and 3, whose packed zero points end in a padding nibble
    shapes = [(32, 128), (64, 128), (32, 96)]
    variants = [Int4Embedding(group, vocab, dim, seed=50 + i) for i, (group, dim) in enumerate(shapes)]
    example = torch.randint(0, vocab, (2, 3), generator=seeded(1))
    path = export(SideBySide(*variants), example, str(tmp_path / "int4_embedding.onnx"))

    model = load(path)
    assert len(nodes(model, "Gather")) == 3 * len(shapes)  # packed rows, scales and zero points
    gathered = sorted(node.input[0] for node in nodes(model, "Gather"))
    tables = [initializers(model)[name] for name in gathered if name.endswith("qweight")]
    assert [list(t.dims) for t in tables] == [[vocab, dim // 2] for _, dim in shapes]
    assert all(t.data_type == onnx.TensorProto.UINT8 for t in tables)  # the packed codes, not a float table
    assert_no_float_weight(model, vocab * 96 // 4)  # larger than any scale table, smaller than any table
    # 4-bit codes, a float32 scale and half a byte of zero point per group, against float32
    float_bytes = sum(vocab * dim * FLOAT32_BYTES for _, dim in shapes)
    assert weight_bytes(model) < 0.2 * float_bytes

    indices = torch.randint(0, vocab, (4, 7), generator=seeded(2))
    indices[0, 0], indices[3, 6] = 0, vocab - 1  # the first and the last rows
    for variant, (_, dim), got in zip(variants, shapes, run_onnx(path, indices)):
        assert got.shape == (4, 7, dim)
        # Tolerance zero: codes and zero points are small integers, exact in float32, so both sides
        # round once, in the same product (q - zero) * scale of the same float32 operands.
        np.testing.assert_array_equal(got, variant.reference(indices).numpy())
