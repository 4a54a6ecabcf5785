"""The storage formats of bevel's quantized weights, and the plain-torch math that makes and reads them.

One definition serves the passes (which quantize), the ops' references, the Triton kernels'
tests and the ONNX translations:

- int8 per channel: ``qweight`` int8 [N, K] in [-127, 127], ``scale`` float32 [N];
  ``w = qweight * scale[:, None]``.
- int4 groups: ``qweight`` uint8 [N, K // 2], byte j of a row holding column 2j in its low nibble
  and column 2j + 1 in its high nibble (the order of ONNX Runtime's ``MatMulNBits``, so a row of
  ``K // group_size`` groups is exactly its [n_blocks, blob_size] layout); ``scale`` float16
  [N, K // group_size] (as GPTQ and AWQ checkpoints store them: float32 scales would add an eighth
  to the bytes of the codes at groups of 64); ``zero`` uint8 [N, ceil(groups / 2)], the 4-bit zero
  points packed the same way; ``w = (q - zero_of_group) * float(scale_of_group)``.
- per-token activations, asymmetric: with ``hi = max(x_row, 0)`` and ``lo = min(x_row, 0)``,
  ``s = max(hi - lo, eps) / 255``, ``zero = round(-lo / s) - 128`` (the code of 0.0) and
  ``xq = clamp(round(x / s + zero), -128, 127)``, each step in float32 and rounding half to even;
  ``x ~ s * (xq - zero)``. Asymmetric because a token's values are rarely centred on zero (a GELU's
  output is at least -0.17): the whole range of 256 codes covers the token's own [lo, hi], where a
  symmetric code spends half of its 255 on values the token does not have. With ``bits=7`` the same
  over 128 codes: ``s = max(hi - lo, eps) / 127``, ``zero = round(-lo / s) - 64``, codes in
  [-64, 63] (CPUs without VNNI multiply those with int8 weights without int16 saturation).
"""

from __future__ import annotations

import torch

INT8_MAX = 127
# the widths per-token codes may have: all of int8, or 7 bits (a token's range [lo, hi] is spread
# over 2 ** bits - 1 steps, so that both ends are codes; see the module docstring)
TOKEN_BITS = (8, 7)
INT4_MAX = 15
# the smallest int4 group scale: float16's smallest normal number (groups narrower than 15 of these,
# about 1e-3, get steps a little coarser than they could)
INT4_MIN_SCALE = float(torch.finfo(torch.float16).tiny)
# the smallest per-token range: a row of zeros gets this scale instead of dividing by zero
TOKEN_SCALE_EPS = 1e-10


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of a [N, K] weight, one scale per output row: (qweight int8, scale float32)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / INT8_MAX
    qweight = torch.clamp(torch.round(w / scale[:, None]), -INT8_MAX, INT8_MAX).to(torch.int8)
    return qweight, scale


def dequantize_int8_per_channel(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 weight an int8 per-channel weight stands for."""
    return qweight.float() * scale.float()[:, None]


def int4_group_params(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit (scale, integer zero point) per group of ``group_size`` input columns, from
    each group's min and max (the range always holds 0, so zero is exact). Scales are float32
    values that float16 holds exactly."""
    n, k = weight.shape
    groups = weight.detach().float().reshape(n, k // group_size, group_size)
    low = groups.amin(dim=2).clamp(max=0.0)
    high = groups.amax(dim=2).clamp(min=0.0)
    scale = _float16_exact((high - low) / INT4_MAX)
    zero = torch.clamp(torch.round(-low / scale), 0, INT4_MAX)
    return scale, zero


def _float16_exact(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` (float32, at least INT4_MIN_SCALE) rounded to the nearest float16 value, so that the
    codes are computed with the scale that is stored."""
    return scale.clamp(min=INT4_MIN_SCALE).half().float()


def searched_int4_group_params(weight: torch.Tensor, group_size: int,
                               shrinks: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`int4_group_params`, but each group's range is the one among ``shrinks`` shrunken
    copies of its [min, max] (down to 55%) that gives the smallest squared rounding error: clipping a
    few outliers buys finer steps for all the other weights."""
    n, k = weight.shape
    groups = weight.detach().float().reshape(n, k // group_size, group_size)
    low = groups.amin(dim=2).clamp(max=0.0)
    high = groups.amax(dim=2).clamp(min=0.0)
    best_error = best_scale = best_zero = None
    for i in range(shrinks):
        ratio = 1.0 - 0.05 * i
        scale = _float16_exact((high - low) * ratio / INT4_MAX)
        zero = torch.clamp(torch.round(-low * ratio / scale), 0, INT4_MAX)
        q = torch.clamp(torch.round(groups / scale[..., None]) + zero[..., None], 0, INT4_MAX)
        error = ((q - zero[..., None]) * scale[..., None] - groups).pow(2).sum(dim=2)
        if best_error is None:
            best_error, best_scale, best_zero = error, scale, zero
        else:
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def quantize_int4_values(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                         group_size: int) -> torch.Tensor:
    """The 4-bit codes (uint8 in [0, 15], unpacked [N, K]) of ``weight`` under the given group params."""
    n, k = weight.shape
    groups = weight.detach().float().reshape(n, k // group_size, group_size)
    q = torch.clamp(torch.round(groups / scale[..., None]) + zero[..., None], 0, INT4_MAX)
    return q.reshape(n, k).to(torch.uint8)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the last dimension, the even one in the low nibble (an odd
    length gets a zero nibble at the end)."""
    if values.shape[-1] % 2:
        values = torch.nn.functional.pad(values, (0, 1))
    values = values.to(torch.uint8)
    return values[..., 0::2] | (values[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, length: int) -> torch.Tensor:
    """The 4-bit codes of :func:`pack_int4`'s output as uint8, the last dimension cut to ``length``."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)[..., :length]


def quantize_int4_groups(weight: torch.Tensor, group_size: int, scale: torch.Tensor | None = None,
                         zero: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest int4 of a [N, K] weight in groups along K: (packed qweight, float16 scale,
    packed zero).

    ``scale``/``zero`` (float [N, groups]) may be given, e.g. chosen by an error-minimizing search.
    """
    if scale is None or zero is None:
        scale, zero = int4_group_params(weight, group_size)
    scale = _float16_exact(scale.float())
    q = quantize_int4_values(weight, scale, zero, group_size)
    return pack_int4(q), scale.half().contiguous(), pack_int4(zero.to(torch.uint8))


def dequantize_int4_groups(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                           group_size: int) -> torch.Tensor:
    """The float32 [N, K] weight an int4 group-quantized weight stands for."""
    n, groups = scale.shape
    k = groups * group_size
    q = unpack_int4(qweight, k).float().reshape(n, groups, group_size)
    z = unpack_int4(zero, groups).float()
    return ((q - z[..., None]) * scale.float()[..., None]).reshape(n, k)


def check_token_bits(bits: int) -> None:
    """A ValueError unless ``bits`` is a per-token code width this format has (7 or 8)."""
    if bits not in TOKEN_BITS:
        raise ValueError(f"per-token activation codes have {' or '.join(map(str, TOKEN_BITS))} bits, not {bits}")


def quantize_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int8 of each row (token) of ``x``, as the module docstring says: (codes float32
    integers in [-128, 127] (with ``bits=7``: [-64, 63]), scale float32 [..., 1], zero float32
    integers [..., 1]), with ``x ~ scale * (codes - zero)``."""
    x = x.float()
    scale, zero = per_token_scale_and_zero(x, bits)
    half = 2 ** (bits - 1)
    return torch.clamp(torch.round(x / scale + zero), -half, half - 1), scale, zero


def per_token_scale_and_zero(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's scale and zero point (float32 [..., 1]) of a float32 ``x``, as the module docstring says."""
    check_token_bits(bits)
    high = x.amax(dim=-1, keepdim=True).clamp(min=0.0)
    low = x.amin(dim=-1, keepdim=True).clamp(max=0.0)
    scale = (high - low).clamp(min=TOKEN_SCALE_EPS) / (2 ** bits - 1)
    return scale, torch.round(-low / scale) - 2 ** (bits - 1)
