"""The quantized linears' Triton kernels against their ops' plain-torch references, in the interpreter.

``triton.jit`` picks interpreter or compiler when a kernel is decorated, reading ``TRITON_INTERPRET``
through ``triton.knobs`` as the kernel modules are imported; so the variable is set here before
they are (``make test`` sets it too), and the suite runs the same without the Makefile. Shapes are
small and ragged against every block size (the interpreter runs each program in Python): M on
both sides of the decode/prefill split and beyond one prefill tile, N and K not multiples of the
blocks, odd numbers of int4 groups (a padded zero-point nibble).

bf16 is checked only where the kernel does not feed it to ``tl.dot``: the interpreter keeps bf16 as
raw uint16 and its dot multiplies those bit patterns. The GPU benchmark
(``benchmarks/quantize_gpu.py``) prints each bf16 kernel's error against its reference.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import triton

from bevel.codegen.kernels import autotune, weight_only_matmul
from bevel.codegen.kernels.quantized_linear import (
    DECODE_MAX_ROWS,
    triton_int4_weight_linear,
    triton_int8_dynamic_linear,
    triton_int8_weight_linear,
)
from bevel.runtime.ops.int4_weight_linear import int4_weight_linear_reference
from bevel.runtime.ops.int8_dynamic_linear import int8_dynamic_linear_reference
from bevel.runtime.ops.int8_weight_linear import int8_weight_linear_reference
from bevel.runtime.ops.quant_format import (
    dequantize_int4_groups,
    dequantize_int8_per_channel,
    quantize_int4_groups,
    quantize_int8_per_channel,
)

N = 100  # ragged against every BLOCK_N (16..256); 100 > 64 so prefill tiles span several columns
ROWS = [1, 7, DECODE_MAX_ROWS, 70]  # decode (1, 7, 16) and prefill (70: two 64-row tiles, ragged)


def _generator(*seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash(seed) % 2**31)


def _linear_inputs(rows: int, k: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = _generator(rows, k, seed)
    x = torch.randn(rows, k, generator=g).to(dtype)
    weight = torch.randn(N, k, generator=g) * 0.1
    bias = torch.randn(N, generator=g)
    return x, weight, bias


def assert_weight_only_close(out: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None) -> None:
    """Weight-only kernels sum the same float32 products as the reference in another order (tiles of
    K, the scale applied to the sums rather than to the weights). Each rounding is at most 2**-24 of
    a partial sum, so the difference is bounded by about K * 2**-24 ~ 1.2e-5 of sum_k |x_k * w_k|
    for K = 200, and in practice, the roundings being of random sign, ~sqrt(K) * 2**-24 ~ 1e-6:
    1e-5 of that sum. In fp16 both results are then rounded to fp16 and may land one fp16 step
    (2**-10 of the value) apart."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    magnitude = x.float().abs() @ weight.abs().T
    if bias is not None:
        magnitude = magnitude + bias.abs()
    tolerance = 1e-5 * magnitude
    if out.dtype == torch.float16:
        tolerance = tolerance + 2.0**-10 * ref.float().abs()
    error = (out.float() - ref.float()).abs()
    assert torch.all(error <= tolerance), f"max error {error.max():.3g}, worst excess {(error - tolerance).max():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", ROWS)
def test_int8_weight_linear_matches_reference(rows, dtype):
    x, weight, bias = _linear_inputs(rows, 200, dtype, seed=1)  # K = 200: ragged against BLOCK_K
    qweight, scale = quantize_int8_per_channel(weight)
    out = triton_int8_weight_linear(x, qweight, scale, bias)
    ref = int8_weight_linear_reference(x, qweight, scale, bias)
    assert_weight_only_close(out, ref, x, dequantize_int8_per_channel(qweight, scale), bias)


@pytest.mark.parametrize("rows", [3, 70])
def test_int8_weight_linear_without_bias(rows):
    x, weight, _ = _linear_inputs(rows, 136, torch.float32, seed=2)
    qweight, scale = quantize_int8_per_channel(weight)
    out = triton_int8_weight_linear(x, qweight, scale, None)
    ref = int8_weight_linear_reference(x, qweight, scale, None)
    assert_weight_only_close(out, ref, x, dequantize_int8_per_channel(qweight, scale), None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [1, 9, 70])
@pytest.mark.parametrize("group_size, groups", [(32, 5), (64, 3)])  # odd counts: a padded zero nibble
def test_int4_weight_linear_matches_reference(group_size, groups, rows, dtype):
    x, weight, bias = _linear_inputs(rows, group_size * groups, dtype, seed=3)
    qweight, scale, zero = quantize_int4_groups(weight, group_size)
    with_bias = bias if rows != 9 else None
    out = triton_int4_weight_linear(x, qweight, scale, zero, group_size, with_bias)
    ref = int4_weight_linear_reference(x, qweight, scale, zero, group_size, with_bias)
    assert_weight_only_close(out, ref, x, dequantize_int4_groups(qweight, scale, zero, group_size), with_bias)


def assert_dynamic_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """The kernels make the reference's codes bit for bit (the same IEEE float32 multiply and
    divisions, ``div_rn`` rather than Triton's approximate ``/``, rounding half to even), so even
    ties like 2.5 round alike; the int32 sums are exact and the epilogue multiplies in the
    reference's order. Only the last step may differ, by FMA contraction on a GPU: 1e-6 relative.
    Half-precision outputs: one step of their format, since the interpreter narrows float32 to bf16
    by truncating where torch rounds to nearest (fp16 converts exactly alike)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    rtol = {torch.float32: 1e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[out.dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=1e-6 * ref.float().abs().max().item())


@pytest.mark.parametrize("smoothed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, DECODE_MAX_ROWS, DECODE_MAX_ROWS + 1, 70])
def test_int8_dynamic_linear_matches_reference(rows, dtype, smoothed):
    x, weight, bias = _linear_inputs(rows, 200, dtype, seed=4)
    qweight, scale = quantize_int8_per_channel(weight)
    input_scale = torch.rand(200, generator=_generator(5)) + 0.5 if smoothed else None
    with_bias = bias if rows != 1 else None
    out = triton_int8_dynamic_linear(x, qweight, scale, with_bias, input_scale)
    ref = int8_dynamic_linear_reference(x, qweight, scale, with_bias, input_scale)
    assert_dynamic_close(out, ref)


@pytest.mark.parametrize("rows", [2, 40])
def test_int8_dynamic_linear_rounds_ties_to_even_and_zero_rows(rows):
    """Rows whose largest value is 127 have scale exactly 1, so their x / s are the values: .5 ties
    must round to even like torch.round. An all-zero row gets the smallest scale and codes 0."""
    k = 136
    x = (torch.randn(rows, k, generator=_generator(6)) * 20).clamp(-100, 100)
    x[:, 0] = 127.0
    x[:, 1:9] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5])
    x[-1] = 0.0
    qweight = torch.eye(k, dtype=torch.int8)[:N] * 127  # output n is code n times 127 * scale
    scale = torch.full((N,), 1.0 / 127)
    bias = torch.randn(N, generator=_generator(7))
    out = triton_int8_dynamic_linear(x, qweight, scale, bias, None)
    ref = int8_dynamic_linear_reference(x, qweight, scale, bias, None)
    assert_dynamic_close(out, ref)
    codes = torch.round(out[0, 1:9] - bias[1:9])
    assert codes.tolist() == [0.0, 2.0, 2.0, 0.0, -2.0, -2.0, 126.0, -126.0]
    torch.testing.assert_close(out[-1], bias, rtol=0, atol=0)


@pytest.mark.parametrize("rows_shape", [(3, 4), (2, 35)])  # 12 rows: decode; 70: prefill
def test_leading_dims_and_non_contiguous_inputs(rows_shape):
    k = 128
    g = _generator(8, *rows_shape)
    # a transposed view: not contiguous, the kernels must not read it with the wrong strides
    x = torch.randn(rows_shape[0], k, rows_shape[1], generator=g).transpose(1, 2)
    assert not x.is_contiguous()
    weight = torch.randn(N, k, generator=g) * 0.1
    bias = torch.randn(N, generator=g)
    qweight, scale = quantize_int8_per_channel(weight)
    out = triton_int8_weight_linear(x, qweight, scale, bias)
    assert out.shape == (*rows_shape, N)
    ref = int8_weight_linear_reference(x, qweight, scale, bias)
    assert_weight_only_close(out, ref, x, dequantize_int8_per_channel(qweight, scale), bias)

    q4, s4, z4 = quantize_int4_groups(weight, 64)
    out = triton_int4_weight_linear(x, q4, s4, z4, 64, None)
    ref = int4_weight_linear_reference(x, q4, s4, z4, 64, None)
    assert_weight_only_close(out, ref, x, dequantize_int4_groups(q4, s4, z4, 64), None)

    out = triton_int8_dynamic_linear(x, qweight, scale, bias, None)
    assert_dynamic_close(out, int8_dynamic_linear_reference(x, qweight, scale, bias, None))


def test_inputs_the_kernels_do_not_take_fall_back_to_the_reference():
    """int4 groups of 16 columns (tiles need 32) and float64 activations run the reference."""
    x = torch.randn(5, 64, generator=_generator(9))
    weight = torch.randn(N, 64, generator=_generator(10))
    q4, s4, z4 = quantize_int4_groups(weight, 16)
    out = triton_int4_weight_linear(x, q4, s4, z4, 16, None)
    torch.testing.assert_close(out, int4_weight_linear_reference(x, q4, s4, z4, 16, None))
    qweight, scale = quantize_int8_per_channel(weight)
    out = triton_int8_weight_linear(x.double(), qweight, scale, None)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, int8_weight_linear_reference(x.double(), qweight, scale, None))


def _config(block_m: int, block_n: int, block_k: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=4,
                         num_stages=stages)


def test_shared_memory_filter_drops_configs_that_do_not_fit():
    small, large = _config(64, 64, 64, 2), _config(128, 256, 64, 4)
    # bf16 activations, int8 weights: (64*64*2 + 64*64) * 2 and (128*64*2 + 256*64) * 4
    assert autotune.shared_memory_bytes(small, 2, 1) == 24576
    assert autotune.shared_memory_bytes(large, 2, 1) == 131072
    assert autotune.shared_memory_bytes(large, 2, 0.5) == 98304  # packed int4: half a byte each
    # plus the one bf16 tile the int8 weight is converted to for tl.dot: 256 * 64 * 2
    assert autotune.shared_memory_bytes(large, 2, 1, converted_bytes=2) == 131072 + 32768
    assert autotune.fitting_configs([large, small], 100 * 1024, 2, 1) == [small]
    assert autotune.fitting_configs([large, small], 232448, 2, 1) == [large, small]  # an H100 takes both
    assert autotune.fitting_configs([large, small], 140 * 1024, 2, 1) == [large, small]
    assert autotune.fitting_configs([large, small], 140 * 1024, 2, 1, converted_bytes=2) == [small]
    # nothing fits: the smallest is kept, so the autotuner always has a config to run
    assert autotune.fitting_configs([large, small], 16 * 1024, 2, 1) == [small]


def test_int4_configs_keep_tiles_inside_a_group():
    x = torch.empty(4, 96, dtype=torch.float16)
    for group_size in (32, 64, 96, 128):
        configs = weight_only_matmul._prune(weight_only_matmul.PREFILL_CONFIGS, {"x_ptr": x},
                                            INT4=True, GROUP_SIZE=group_size)
        assert configs, group_size
        assert all(group_size % c.kwargs["BLOCK_K"] == 0 and c.kwargs["BLOCK_K"] >= 32 for c in configs)
