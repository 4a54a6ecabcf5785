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

from bevel.codegen.kernels import autotune, dequantize, gemv, weight_only_matmul
from bevel.codegen.kernels.quantized_linear import (
    DECODE_MAX_ROWS,
    DEQUANTIZE_MIN_ROWS,
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


@pytest.mark.parametrize("rows", [3, 40])
def test_int8_dynamic_linear_rounds_ties_to_even_and_zero_rows(rows):
    """A row ranging over [-128, 127] has scale exactly 1 and zero point 0, so its x / s + zero are
    the values: .5 ties must round to even like torch.round. One ranging over [-55, 200] has scale 1
    and zero point -73, so its ties fall on x - 73 (0.5 -> -72.5 -> -72, standing for 1). An
    all-zero row gets the smallest scale, codes equal to its zero point, and exactly the bias."""
    k = 136
    x = (torch.randn(rows, k, generator=_generator(6)) * 20).clamp(-100, 100)
    x[0, 0], x[0, 9] = 127.0, -128.0
    x[0, 1:9] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5])
    x[1].clamp_(-55, 200)
    x[1, 0], x[1, 9] = 200.0, -55.0
    x[1, 1:9] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -50.5])
    x[-1] = 0.0
    qweight = torch.eye(k, dtype=torch.int8)[:N] * 127  # output n is (code n - zero) times 127 * scale
    scale = torch.full((N,), 1.0 / 127)
    bias = torch.randn(N, generator=_generator(7))
    out = triton_int8_dynamic_linear(x, qweight, scale, bias, None)
    ref = int8_dynamic_linear_reference(x, qweight, scale, bias, None)
    assert_dynamic_close(out, ref)
    assert torch.round(out[0, 1:9] - bias[1:9]).tolist() == [0.0, 2.0, 2.0, 0.0, -2.0, -2.0, 126.0, -126.0]
    assert torch.round(out[1, 1:9] - bias[1:9]).tolist() == [1.0, 1.0, 3.0, -1.0, -1.0, -3.0, 127.0, -51.0]
    torch.testing.assert_close(out[-1], bias, rtol=0, atol=0)


@pytest.mark.parametrize("rows", [DECODE_MAX_ROWS, 70])
def test_int8_dynamic_linear_with_7_bit_codes_matches_reference(rows):
    """7-bit codes: a row ranging over [-64, 63] has scale exactly 1 and zero point 0, so its ties
    round to even as in torch.round; the other rows are random, smoothed, with a bias."""
    k = 136
    x = torch.randn(rows, k, generator=_generator(10)) * 3
    x[0, 0], x[0, 9] = 63.0, -64.0
    x[0, 1:9] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 62.5, -62.5])
    x[0, 10:].clamp_(-64, 63)
    qweight = torch.eye(k, dtype=torch.int8)[:N] * 127  # output n is (code n - zero) times 127 * scale
    scale = torch.full((N,), 1.0 / 127)
    bias = torch.randn(N, generator=_generator(11))
    out = triton_int8_dynamic_linear(x, qweight, scale, bias, None, 7)
    assert_dynamic_close(out, int8_dynamic_linear_reference(x, qweight, scale, bias, None, 7))
    assert torch.round(out[0, 1:9] - bias[1:9]).tolist() == [0.0, 2.0, 2.0, 0.0, -2.0, -2.0, 62.0, -62.0]
    _, weight, _ = _linear_inputs(rows, k, torch.float32, seed=12)
    qweight, scale = quantize_int8_per_channel(weight)
    input_scale = torch.rand(k, generator=_generator(13)) + 0.5
    out = triton_int8_dynamic_linear(x, qweight, scale, bias, input_scale, 7)
    assert_dynamic_close(out, int8_dynamic_linear_reference(x, qweight, scale, bias, input_scale, 7))


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequantize_kernels_equal_the_reference_rounded_once(dtype):
    """Both kernels do the reference's float32 arithmetic, then one rounding to ``dtype`` (which the
    interpreter does as torch for fp16): equal bit for bit. N = 100 and K = 160 are ragged against
    the kernels' blocks; 5 groups leave a padded zero-point nibble."""
    weight = torch.randn(N, 160, generator=_generator(11)) * 0.1
    qweight, scale = quantize_int8_per_channel(weight)
    assert torch.equal(dequantize.dequantize_int8(qweight, scale, dtype),
                       dequantize_int8_per_channel(qweight, scale).to(dtype))
    q4, s4, z4 = quantize_int4_groups(weight, 32)
    assert torch.equal(dequantize.dequantize_int4(q4, s4.float(), z4, 32, dtype),
                       dequantize_int4_groups(q4, s4, z4, 32).to(dtype))


# configs that differ only in how the loop is pipelined compute alike in the interpreter (it ignores
# the stages): one of each tile shape
GEMV_TILES = list({(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]): c for c in reversed(gemv.GEMV_CONFIGS)}.values())


@pytest.mark.parametrize("config", GEMV_TILES, ids=lambda c: f"{c.kwargs['BLOCK_N']}x{c.kwargs['BLOCK_K']}")
def test_every_gemv_config_matches_the_reference(config):
    """The interpreter's autotuner runs the first config only; each tile shape a GPU may pick is run
    here (int8 with K = 200 ragged against every BLOCK_K; int4 with 5 groups of 32 and 3 of 64)."""
    x, weight, bias = _linear_inputs(1, 200, torch.float32, seed=14)
    qweight, scale = quantize_int8_per_channel(weight)
    out = torch.empty(N)
    grid = (triton.cdiv(N, config.kwargs["BLOCK_N"]),)
    gemv.gemv_kernel[grid](x, qweight, scale, scale, bias, out, N, 200, qweight.stride(0), 0, 0, False, 0, True,
                           **config.kwargs)
    ref = int8_weight_linear_reference(x, qweight, scale, bias)
    assert_weight_only_close(out[None], ref, x, dequantize_int8_per_channel(qweight, scale), bias)
    for group_size, groups in ((32, 5), (64, 3)):
        x, weight, _ = _linear_inputs(1, group_size * groups, torch.float32, seed=15)
        q4, s4, z4 = quantize_int4_groups(weight, group_size)
        block_k = max(config.kwargs["BLOCK_K"], group_size)
        gemv.gemv_kernel[grid](x, q4, s4.float(), z4, s4, out, N, group_size * groups, q4.stride(0), s4.stride(0),
                               z4.stride(0), True, group_size, False, BLOCK_N=config.kwargs["BLOCK_N"],
                               BLOCK_K=block_k, LOOP_STAGES=config.kwargs["LOOP_STAGES"])
        ref = int4_weight_linear_reference(x, q4, s4, z4, group_size, None)
        assert_weight_only_close(out[None], ref, x, dequantize_int4_groups(q4, s4, z4, group_size), None)


def test_single_rows_take_the_gemv_kernel(monkeypatch):
    launched = []

    class Recorder:
        def __getitem__(self, grid):
            launched.append(grid)
            return real_gemv[grid]

    real_gemv = gemv.gemv
    monkeypatch.setattr(gemv, "gemv", Recorder())
    x, weight, bias = _linear_inputs(1, 128, torch.float16, seed=16)
    qweight, scale = quantize_int8_per_channel(weight)
    out8 = triton_int8_weight_linear(x, qweight, scale, bias)
    q4, s4, z4 = quantize_int4_groups(weight, 64)
    out4 = triton_int4_weight_linear(x, q4, s4, z4, 64, bias)
    assert len(launched) == 2
    assert_weight_only_close(out8, int8_weight_linear_reference(x, qweight, scale, bias), x,
                             dequantize_int8_per_channel(qweight, scale), bias)
    assert_weight_only_close(out4, int4_weight_linear_reference(x, q4, s4, z4, 64, bias), x,
                             dequantize_int4_groups(q4, s4, z4, 64), bias)


real_int8, real_int4 = dequantize.dequantize_int8, dequantize.dequantize_int4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_weight_only_prefill_through_dequantized_weight(dtype, monkeypatch):
    """The dequantize-then-``F.linear`` path, forced at 70 rows and taken by default at
    DEQUANTIZE_MIN_ROWS fp16 rows. Against the reference it adds one rounding of each weight to
    ``dtype`` (2**-11 of |w| in fp16, none in fp32) to :func:`assert_weight_only_close`'s bound."""
    calls = []
    monkeypatch.setattr(dequantize, "dequantize_int8", lambda *a: calls.append("int8") or real_int8(*a))
    monkeypatch.setattr(dequantize, "dequantize_int4", lambda *a: calls.append("int4") or real_int4(*a))
    for rows, prefill in ((70, "dequantize"), (DEQUANTIZE_MIN_ROWS, "auto")):
        x, weight, bias = _linear_inputs(rows, 128, dtype, seed=12)
        qweight, scale = quantize_int8_per_channel(weight)
        q4, s4, z4 = quantize_int4_groups(weight, 64)
        outputs = [
            (triton_int8_weight_linear(x, qweight, scale, bias, prefill=prefill),
             int8_weight_linear_reference(x, qweight, scale, bias), dequantize_int8_per_channel(qweight, scale)),
            (triton_int4_weight_linear(x, q4, s4, z4, 64, bias, prefill=prefill),
             int4_weight_linear_reference(x, q4, s4, z4, 64, bias), dequantize_int4_groups(q4, s4, z4, 64)),
        ]
        for out, ref, dequantized in outputs:
            assert out.dtype == ref.dtype and out.shape == ref.shape
            magnitude = x.float().abs() @ dequantized.abs().T + bias.abs()
            tolerance = 1e-5 * magnitude
            if dtype == torch.float16:
                tolerance = tolerance + 2.0**-11 * magnitude + 2.0**-10 * ref.float().abs()
            assert torch.all((out.float() - ref.float()).abs() <= tolerance)
    expected = ["int8", "int4"] * (2 if dtype == torch.float16 else 1)  # auto keeps the kernel for fp32
    assert calls == expected


def test_unknown_prefill_path_is_refused():
    x, weight, bias = _linear_inputs(70, 64, torch.float32, seed=13)
    qweight, scale = quantize_int8_per_channel(weight)
    with pytest.raises(ValueError, match="prefill must be one of"):
        triton_int8_weight_linear(x, qweight, scale, bias, prefill="cublas")


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
