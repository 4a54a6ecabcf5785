"""The quantized ops' formats, CPU paths and fake faces, against their plain-torch references.

Tolerances:
- int8_dynamic_linear on the CPU sums the same integer codes as the reference (fbgemm accumulates
  in int32, the reference in float64, both exact), so the two differ only by float32 rounding of
  the scaling: 1e-5 relative to the output's largest value.
- int8_weight_linear carries each token as 15-bit integers (two int8 digits): its error against
  the float reference is at most half a step of 1/32512 of the token's largest |x| per input,
  summed over K inputs times |w|; we bound it by 1e-4 of the output's largest value, which that
  gives with margin for these sizes (K <= 96).
  Where fbgemm saturates (CPUs without VNNI) the digits are base 128 (14 bits), bounded by the
  worst case explicitly.
- int4_weight_linear on the CPU also re-rounds the weight onto an int8 grid per row (half an int8
  step of the row's largest |w|), bounded against the reference with that step explicitly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import bevel  # noqa: F401  (registers the ops)
from bevel.runtime.ops import cpu_integer_linear
from bevel.runtime.ops.int4_weight_linear import int4_weight_linear_reference
from bevel.runtime.ops.int8_dynamic_linear import int8_dynamic_linear_reference
from bevel.runtime.ops.int8_embedding import int8_embedding_reference
from bevel.runtime.ops.int8_weight_linear import int8_weight_linear_reference
from bevel.runtime.ops.quant_format import (dequantize_int4_groups, dequantize_int8_per_channel, pack_int4,
                                            quantize_int4_groups, quantize_int8_per_channel, quantize_per_token,
                                            searched_int4_group_params, unpack_int4)
from tests.models_zoo import seeded

ops = torch.ops.bevel


def test_int4_packing_round_trips_and_puts_the_even_column_in_the_low_nibble():
    values = torch.randint(0, 16, (3, 10), dtype=torch.uint8, generator=seeded(0))
    packed = pack_int4(values)
    assert packed.shape == (3, 5) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed, 10), values)
    assert int(pack_int4(torch.tensor([[1, 2]]))[0, 0]) == 0x21
    assert torch.equal(unpack_int4(pack_int4(values[:, :7]), 7), values[:, :7])  # odd length: a zero pad nibble


def test_int8_per_channel_error_is_within_half_a_step():
    w = torch.randn(24, 40, generator=seeded(1))
    q, s = quantize_int8_per_channel(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and s.shape == (24,)
    assert ((dequantize_int8_per_channel(q, s) - w).abs() <= s[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("group_size", [16, 32])
def test_int4_groups_error_is_within_half_a_step_and_zero_is_exact(group_size):
    w = torch.randn(6, 64, generator=seeded(2))
    w[0, :group_size] = 0.0  # an all-zero group
    q, scale, zero = quantize_int4_groups(w, group_size)
    assert q.shape == (6, 32) and scale.shape == (6, 64 // group_size) and zero.shape == (6, 64 // group_size // 2)
    approx = dequantize_int4_groups(q, scale, zero, group_size)
    step = scale.repeat_interleave(group_size, dim=1)
    assert ((approx - w).abs() <= step / 2 + 1e-6).all()
    assert (approx[0, :group_size] == 0).all()


def test_clipping_search_never_does_worse_than_the_full_range():
    w = torch.randn(32, 128, generator=seeded(3))
    w[:, 5] *= 8  # outliers that widen their groups
    plain = dequantize_int4_groups(*quantize_int4_groups(w, 64), 64)
    scale, zero = searched_int4_group_params(w, 64)
    searched = dequantize_int4_groups(*quantize_int4_groups(w, 64, scale, zero), 64)
    per_group = lambda a: (a - w).pow(2).reshape(32, 2, 64).sum(-1)  # noqa: E731
    assert (per_group(searched) <= per_group(plain) + 1e-9).all()
    assert per_group(searched).sum() < per_group(plain).sum()


def test_per_token_codes_span_each_rows_own_range():
    """Asymmetric codes: a row's range [min(x, 0), max(x, 0)] is spread over all 256 codes, so its
    smallest value gets -128 and its largest 127; 0.0 is exactly the zero point; every value is
    within half a step of what its code stands for."""
    x = torch.randn(5, 33, generator=seeded(4))
    x[2] = 0.0
    x[3] = x[3].abs() + 0.1  # positive only: the range is [0, max], its step max / 255
    codes, scale, zero = quantize_per_token(x)
    assert torch.equal(codes.amax(dim=1)[[0, 1, 3, 4]], torch.full((4,), 127.0))
    assert torch.equal(codes.amin(dim=1)[[0, 1, 4]], torch.full((3,), -128.0))
    assert zero[3] == -128 and torch.allclose(scale[3], x[3].max() / 255)
    assert (codes[2] == zero[2]).all() and (scale > 0).all()
    assert ((scale * (codes - zero) - x).abs() <= scale * 0.5001).all()


def test_7_bit_per_token_codes_span_each_rows_own_range_over_128_codes():
    x = torch.randn(5, 33, generator=seeded(4))
    x[3] = x[3].abs() + 0.1
    codes, scale, zero = quantize_per_token(x, bits=7)
    assert torch.equal(codes.amax(dim=1)[[0, 1, 3, 4]], torch.full((4,), 63.0))
    assert torch.equal(codes.amin(dim=1)[[0, 1, 4]], torch.full((3,), -64.0))
    assert zero[3] == -64 and torch.allclose(scale[3], x[3].max() / 127)
    assert ((scale * (codes - zero) - x).abs() <= scale * 0.5001).all()
    with pytest.raises(ValueError, match="8 or 7 bits, not 6"):
        quantize_per_token(x, bits=6)


@pytest.fixture(params=cpu_integer_linear.usable_backends())
def gemm(request, monkeypatch):
    """Each integer GEMM this machine runs exactly (fbgemm everywhere on x86, oneDNN with VNNI), forced."""
    monkeypatch.setattr(cpu_integer_linear, "GEMM", request.param)
    return request.param


def _random_linear(n=48, k=96, seed=5):
    g = seeded(seed)
    return torch.randn(n, k, generator=g) * 0.1, torch.randn(n, generator=g), torch.randn(3, 7, k, generator=g)


@pytest.mark.parametrize("with_bias", [True, False])
def test_int8_weight_linear_cpu_path_matches_the_reference(with_bias, gemm):
    w, b, x = _random_linear()
    b = b if with_bias else None
    q, s = quantize_int8_per_channel(w)
    reference = int8_weight_linear_reference(x, q, s, b)
    out = ops.int8_weight_linear(x, q, s, b)
    assert out.shape == (3, 7, 48) and out.dtype == x.dtype
    if gemm == "fbgemm" and cpu_integer_linear.fbgemm_saturates():  # base-128 digits on this CPU
        assert ((out - reference).abs() <= _base_128_digits_bound(x, q, s, reference)).all()
    else:
        assert (out - reference).abs().max() <= 1e-4 * reference.abs().max()


def _base_128_digits_bound(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The worst case of base-128 digits: each input off by at most half a step, 1/8064 of its token's
    largest |x|, so each output by at most that times the sum of its row's |w| (plus float32 rounding)."""
    half_step = x.abs().amax(dim=-1, keepdim=True) / (63 * 128) / 2
    return half_step * dequantize_int8_per_channel(q, s).abs().sum(dim=1) + 1e-5 * reference.abs().max()


@pytest.mark.parametrize("bits", [8, 7])
@pytest.mark.parametrize("with_smoothing", [True, False])
def test_int8_dynamic_linear_cpu_path_sums_exactly_what_the_reference_sums(with_smoothing, bits, gemm):
    w, b, x = _random_linear(seed=6)
    x[0, 0] = 0.0  # a token of zeros
    x[1, 2, :] = torch.where(torch.arange(96) % 2 == 0, 5.0, -5.0)  # codes at both ends everywhere
    q, s = quantize_int8_per_channel(w)
    q[0] = 127  # weights at the end of the range too: no int16 saturation may happen
    smoothing = torch.rand(96, generator=seeded(7)) + 0.5 if with_smoothing else None
    reference = int8_dynamic_linear_reference(x, q, s, b, smoothing, bits)
    out = ops.int8_dynamic_linear(x, q, s, b, smoothing, bits)
    assert (out - reference).abs().max() <= 1e-5 * reference.abs().max()
    if bits == 7:  # the coarser codes are a different result, not the same one
        assert (out - ops.int8_dynamic_linear(x, q, s, b, smoothing)).abs().max() > 1e-3 * reference.abs().max()


def test_int8_dynamic_linear_refuses_codes_of_other_widths():
    w, b, x = _random_linear(seed=6)
    q, s = quantize_int8_per_channel(w)
    with pytest.raises(ValueError, match="8 or 7 bits, not 4"):
        ops.int8_dynamic_linear(x, q, s, b, None, 4)


def test_int4_weight_linear_cpu_path_stays_within_the_int8_regrid_of_the_reference(gemm):
    w, b, x = _random_linear(seed=8)
    q, scale, zero = quantize_int4_groups(w, 32)
    reference = int4_weight_linear_reference(x, q, scale, zero, 32, b)
    out = ops.int4_weight_linear(x, q, scale, zero, 32, b)
    dense = dequantize_int4_groups(q, scale, zero, 32)
    int8_step = dense.abs().amax(dim=1) / 127  # the CPU path's extra rounding of each row
    bound = (x.abs().sum(-1, keepdim=True) * int8_step / 2) * 1.01 + 1e-4 * reference.abs().max()
    assert ((out - reference).abs() <= bound).all()
    exact = torch.nn.functional.linear(x, dense, b)
    assert (reference - exact).abs().max() <= 1e-5 * exact.abs().max()


def test_int8_embedding_gathers_rows_and_scales():
    w = torch.randn(50, 12, generator=seeded(9))
    q, s = quantize_int8_per_channel(w)
    idx = torch.tensor([[0, 49, 3], [3, 3, 7]])
    out = ops.int8_embedding(q, s, idx)
    assert torch.equal(out, int8_embedding_reference(q, s, idx))
    assert torch.equal(out, dequantize_int8_per_channel(q, s)[idx])


def test_fake_faces_give_shapes_and_dtypes_without_computing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    w, b, _ = _random_linear()
    q, s = quantize_int8_per_channel(w)
    q4, scale, zero = quantize_int4_groups(w, 32)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fx_ = torch.empty(2, 5, 96)
        assert ops.int8_weight_linear(fx_, q, s, b).shape == (2, 5, 48)
        assert ops.int8_dynamic_linear(fx_, q, s, None, None).shape == (2, 5, 48)
        assert ops.int4_weight_linear(fx_, q4, scale, zero, 32, b).shape == (2, 5, 48)
        out = ops.int8_embedding(q, s, torch.zeros(2, 3, dtype=torch.long))
        assert out.shape == (2, 3, 96) and out.dtype == torch.float32


def test_codes_half_way_between_integers_round_to_even_in_every_gemm(gemm):
    """The GEMMs round the codes they read; the reference rounds with torch.round (half to even)."""
    q = torch.eye(8, dtype=torch.int8)
    packed = cpu_integer_linear.PackedWeight(q, torch.ones(8))
    codes = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -127.5]]).repeat(200, 1)  # oneDNN's row count
    expected = torch.round(codes)
    assert torch.equal(cpu_integer_linear.integer_matmul(codes, packed), expected)


def _pair_overflowing_gemm(rows: int, columns: int, outputs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int8 weights and codes at the ends of their ranges, plus random ones: many pairs of products
    beyond int16 (255 * 127 twice), and the exact float32 result ``fl(sums * scale)``."""
    g = seeded(30)
    weight = torch.randint(-127, 128, (outputs, columns), generator=g, dtype=torch.int8)
    weight[: outputs // 2] = torch.where(torch.arange(columns) % 3 == 0, -127, 127).to(torch.int8)
    codes = torch.randint(-128, 128, (rows, columns), generator=g).float()
    codes[: rows // 2] = torch.where(torch.arange(columns) % 3 == 0, -128.0, 127.0)
    scale = torch.rand(outputs, generator=g) + 0.5
    exact = (codes.double() @ weight.double().T).float() * scale  # the sums are below 2^24: exact in float32
    return codes, cpu_integer_linear.PackedWeight(weight, scale), exact


def test_the_saturation_probe_agrees_with_a_gemm_whose_pairs_overflow_int16():
    """fbgemm_saturates() says whether the whole-weight GEMM is exact here; checked on other data."""
    codes, packed, exact = _pair_overflowing_gemm(9, 40, 24)
    whole = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
        codes, 1.0, 128, cpu_integer_linear._fbgemm_packed(packed.qweight, packed.scale))
    assert torch.equal(whole, exact) == (not cpu_integer_linear.fbgemm_saturates())


def test_split_weights_give_the_whole_weights_result_bit_for_bit(monkeypatch):
    """Where fbgemm saturates, the weight is packed as halves in [-64, 63] and {0, 1}: the same
    float32 result as an exact GEMM, fl(sums * scale), forced here on any CPU."""
    monkeypatch.setattr(cpu_integer_linear, "GEMM", "fbgemm")
    monkeypatch.setattr(cpu_integer_linear, "fbgemm_saturates", lambda: True)
    codes, packed, exact = _pair_overflowing_gemm(9, 40, 24)
    assert torch.equal(cpu_integer_linear.integer_matmul(codes, packed), exact)
    assert set(packed.packed) == {"fbgemm split"}


@pytest.mark.parametrize("with_bias", [True, False])
def test_int8_weight_linear_with_base_128_digits_matches_the_reference(with_bias, monkeypatch):
    """Where fbgemm saturates, tokens are carried as base-128 digits (14 bits instead of 15), forced
    here, within their worst case (:func:`_base_128_digits_bound`)."""
    monkeypatch.setattr(cpu_integer_linear, "GEMM", "fbgemm")
    monkeypatch.setattr(cpu_integer_linear, "fbgemm_saturates", lambda: True)
    w, b, x = _random_linear(seed=11)
    b = b if with_bias else None
    q, s = quantize_int8_per_channel(w)
    reference = int8_weight_linear_reference(x, q, s, b)
    out = ops.int8_weight_linear(x, q, s, b)
    assert ((out - reference).abs() <= _base_128_digits_bound(x, q, s, reference)).all()
    assert (out - reference).abs().max() > 1e-7  # the digits' rounding shows: this is not the float path


def test_the_quantized_linears_stay_exact_where_fbgemm_saturates():
    """fbgemm restricted to its AVX2 kernels (as on CPUs without VNNI, whatever this one has), in a
    process of its own: the probe finds the saturation and the ops match their references: 8-bit W8A8
    codes on split weights, weight-only digits and 7-bit W8A8 codes on whole ones."""
    check = textwrap.dedent("""
        import torch, bevel
        from bevel.runtime.ops import cpu_integer_linear
        from bevel.runtime.ops.int8_dynamic_linear import int8_dynamic_linear_reference
        from bevel.runtime.ops.int8_weight_linear import int8_weight_linear_reference
        from bevel.runtime.ops.quant_format import quantize_int8_per_channel
        from tests.runtime.test_quant_ops import _base_128_digits_bound
        assert cpu_integer_linear.fbgemm_saturates()
        g = torch.Generator().manual_seed(0)
        q, s = quantize_int8_per_channel(torch.randn(48, 96, generator=g))
        q[0] = 127
        x = torch.randn(3, 7, 96, generator=g)
        x[1, 2] = torch.where(torch.arange(96) % 2 == 0, 5.0, -5.0)
        packings = lambda: set(cpu_integer_linear._packed_cache[id(q)][2].packed)  # noqa: E731
        ref = int8_dynamic_linear_reference(x, q, s, None, None)
        assert (torch.ops.bevel.int8_dynamic_linear(x, q, s, None, None) - ref).abs().max() <= 1e-5 * ref.abs().max()
        assert packings() == {"fbgemm split"}
        ref = int8_weight_linear_reference(x, q, s, None)
        bound = _base_128_digits_bound(x, q, s, ref)
        assert ((torch.ops.bevel.int8_weight_linear(x, q, s, None) - ref).abs() <= bound).all()
        assert packings() == {"fbgemm"}  # whole
        q7 = q.clone()  # 7-bit codes (read as [0, 127]) take the whole weight, unsplit
        ref = int8_dynamic_linear_reference(x, q7, s, None, None, 7)
        out = torch.ops.bevel.int8_dynamic_linear(x, q7, s, None, None, 7)
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
        assert set(cpu_integer_linear._packed_cache[id(q7)][2].packed) == {"fbgemm"}  # whole
        print("exact")
    """)
    env = {**os.environ, "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # where tests/ imports from
    run = subprocess.run([sys.executable, "-c", check], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "exact", run.stderr[-3000:]


def test_automatic_choice_takes_onednn_for_large_calls_on_amx_cpus_only(monkeypatch):
    monkeypatch.setattr(cpu_integer_linear, "usable_backends", lambda: ["fbgemm", "onednn"])
    for amx in (True, False):
        monkeypatch.setattr(cpu_integer_linear, "_cpu_has", lambda feature, amx=amx: amx)
        rows = cpu_integer_linear.ONEDNN_MIN_ROWS
        assert cpu_integer_linear._backend(rows) == ("onednn" if amx else "fbgemm")
        assert cpu_integer_linear._backend(rows - 1) == "fbgemm"
    monkeypatch.setattr(cpu_integer_linear, "usable_backends", lambda: ["fbgemm"])
    monkeypatch.setattr(cpu_integer_linear, "GEMM", "onednn")
    with pytest.raises(RuntimeError, match="onednn"):
        cpu_integer_linear._backend(4096)


def test_packed_weights_are_made_again_when_the_stored_weight_changes(gemm):
    w, b, x = _random_linear(seed=10)
    q, s = quantize_int8_per_channel(w)
    first = ops.int8_dynamic_linear(x, q, s, b, None)
    q.mul_(-1)  # written in place: the cached packing must not be reused
    second = ops.int8_dynamic_linear(x, q, s, b, None)
    assert torch.allclose(second - b, -(first - b), atol=1e-4)
    assert cpu_integer_linear.available()
