"""``bevel::quantize_kv`` and ``bevel::dequantize_kv``: keys and values stored in 8 or 4 bits, per token
and head in groups of ``group_size`` channels (the KIVI / ZipCache family of KV-cache compression).

- 8 bits: symmetric, ``code = round(x / scale)`` in [-127, 127] (int8), ``scale = max |x| / 127``;
- 4 bits: asymmetric, ``code = round((x - low) / scale)`` in [0, 15], ``scale = (high - low) / 15``,
  two codes per byte (uint8; the even channel in the low nibble), as 4 bits need the offset to keep
  a group's range.

Codes are [..., D] (int8) or [..., D / 2] (uint8); the parameters ``params`` [..., D / group_size, P]
float32 hold each group's scale (``P = 1``) and, for 4 bits, its low end (``P = 2``). A group of
zeros has scale 0 and decodes to zeros. Dequantizing is ``code * scale (+ low)`` in float32, the
same arithmetic the attention kernels do inside, so a cache that stores codes gives the same values
as one that stores their dequantized floats. Both ops are elementwise in plain torch and run on any
device as they are (no Triton face); their ONNX translations are in ``attention_onnx.py``.
"""

from __future__ import annotations

import torch

BITS = (4, 8)


def params_per_group(bits: int) -> int:
    """How many float32 numbers describe a group: its scale, and for 4 bits its low end."""
    return 1 if bits == 8 else 2


def code_width(dim: int, bits: int) -> int:
    """Channels of the stored codes for ``dim`` channels: one byte per channel at 8 bits, half at 4."""
    return dim if bits == 8 else dim // 2


def check_layout(dim: int, bits: int, group_size: int) -> None:
    """Refuse a layout the ops cannot store (ValueError; passes check their parameters first)."""
    if bits not in BITS:
        raise ValueError(f"KV cache quantization takes bits 8 or 4, got {bits}")
    if group_size < 1 or dim % group_size:
        raise ValueError(f"group_size={group_size} must divide the head dimension {dim}")
    if bits == 4 and group_size % 2:
        raise ValueError(f"4-bit codes are stored two per byte: group_size={group_size} must be even")


def quantize_kv_reference(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, params)`` of ``x`` [..., D] (see the module docstring)."""
    check_layout(x.shape[-1], bits, group_size)
    groups = x.float().reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    if bits == 8:
        scale = groups.abs().amax(dim=-1, keepdim=True) / 127
        codes = torch.round(groups / torch.where(scale > 0, scale, 1.0)).clamp(-127, 127)
        return codes.reshape(x.shape).to(torch.int8), scale
    low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
    scale = (high - low) / 15
    codes = torch.round((groups - low) / torch.where(scale > 0, scale, 1.0)).clamp(0, 15).to(torch.uint8)
    codes = codes.reshape(*x.shape[:-1], -1, 2)
    return codes[..., 0] | (codes[..., 1] << 4), torch.cat([scale, low], dim=-1)


def dequantize_kv_reference(codes: torch.Tensor, params: torch.Tensor, bits: int, group_size: int,
                            dtype: torch.dtype) -> torch.Tensor:
    """The values ``codes`` and ``params`` stand for, [..., D] in ``dtype`` (computed in float32)."""
    if bits == 8:
        values = codes.float()
    else:
        values = torch.stack([codes & 15, codes >> 4], dim=-1).reshape(*codes.shape[:-1], -1).float()
    groups = values.reshape(*values.shape[:-1], -1, group_size)
    out = groups * params[..., :1]
    if bits == 4:
        out = out + params[..., 1:]
    return out.reshape(values.shape).to(dtype)


@torch.library.custom_op("bevel::quantize_kv", mutates_args=())
def quantize_kv(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and group parameters of keys or values ``x`` [..., D] (see the module docstring)."""
    return quantize_kv_reference(x, bits, group_size)


@quantize_kv.register_fake
def _(x, bits, group_size):
    dim = x.shape[-1]
    codes = x.new_empty((*x.shape[:-1], code_width(dim, bits)), dtype=torch.int8 if bits == 8 else torch.uint8)
    return codes, x.new_empty((*x.shape[:-1], dim // group_size, params_per_group(bits)), dtype=torch.float32)


@torch.library.custom_op("bevel::dequantize_kv", mutates_args=())
def dequantize_kv(codes: torch.Tensor, params: torch.Tensor, bits: int, group_size: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """The keys or values [..., D] in ``dtype`` that ``codes`` and ``params`` stand for."""
    return dequantize_kv_reference(codes, params, bits, group_size, dtype)


@dequantize_kv.register_fake
def _(codes, params, bits, group_size, dtype):
    dim = codes.shape[-1] if bits == 8 else codes.shape[-1] * 2
    return codes.new_empty((*codes.shape[:-1], dim), dtype=dtype)
