"""The fast CPU path of the quantized linears: int8 x int8 GEMMs with int32 accumulation, in
PyTorch's x86 quantized engine (fbgemm) or, on CPUs with AMX, in oneDNN.

Measured on a 2-core x86 CPU with AVX2 only, x [4096, 384] by W [1536, 384]: fp32 ``F.linear``
34-43 ms, fbgemm's int8 GEMM (``quantized::linear_with_input_q_dq_qweight_dq_output_fp32``)
9-10 ms, while ``torch._int_mm`` and ``torch._weight_int8pack_mm`` take seconds and the group-wise
``_weight_int4pack_mm_for_cpu`` 2.2 s. On a 2-core CPU with AMX (Sapphire Rapids), the same
shape: fp32 12.2 ms, fbgemm 9.9 ms, oneDNN's ``qlinear_pointwise`` 2.1 ms (at [4096, 1536] by
[384, 1536] 5.1 against 3.4 ms; at 16 rows fbgemm is faster, 0.034 against 0.039 ms). So oneDNN
takes the calls of at least ``ONEDNN_MIN_ROWS`` rows where the CPU has AMX, fbgemm the rest
(``GEMM``: "auto", or "fbgemm" / "onednn" to force one).

Both take activations as uint8 with one scale and zero point per call, so the per-token scales are
applied outside: bevel hands them integer codes (``scale=1``, ``zero_point=128``, exact for codes
in [-128, 127]) and multiplies the int32 sums by the token scales afterwards. The per-token zero
points of W8A8 are folded into the same GEMM: the weight carries J more columns that sum to minus
its row's sum, and each token J more codes equal to its zero point, so the GEMM returns
``xq @ w.T - zero * w.sum(1)`` itself (J = ceil(max |row sum| / 127), 8-56 columns on MiniLM's
K of 384 and 1536: at 4096 rows, on a 2-core AVX-512 CPU, 1-14% more time per GEMM, where
subtracting the rank-one term from the output afterwards took 9-90%). Their results are exact
integer sums, checked in the tests against the reference, also on codes at the ends of the range.
CPUs without VNNI (AVX2 only, or AVX-512 without VNNI) sum each pair of uint8 x int8 products in
int16 first (``vpmaddubsw``), which saturates: 255 * 127 twice is 64770. oneDNN is used only where
the CPU has VNNI; fbgemm is probed once per process (:func:`fbgemm_saturates`), and where it
saturates its weights are packed split in two, ``w = 2 * floor(w / 2) + (w mod 2)``: halves in
[-64, 63] and {0, 1}, whose pairs stay within int16, stacked as one GEMM of twice the outputs
whose integer sums are combined afterwards (exact again while each half's sum stays below 2^24,
which (K + J) * 128 * 64 does up to 2048 inputs; at about twice the GEMM time). On MiniLM the
saturating GEMMs had taken W8A8's minimum embedding cosine from 0.998 to 0.974. 7-bit W8A8 codes
(``bits=7``) are read with zero point 64, as [0, 127], and need no split.

Weight-only ops keep their activations in float; to run them on integer GEMMs each token is split
into two int8 digits (``x ~ s * (256 * hi + lo)``, |x| / s <= 127 * 256: 15 bits per token; where
fbgemm saturates, base 128 with |x| / s <= 63 * 128: 14 bits, each digit read as at most 128, which
needs no split), so the activation error (a step of 1/32512 of the token's largest value, 1/8064
in base 128) stays far below the weight's quantization error.

The packed weights are made once per quantized weight and backend, and cached beside it (weakly,
so they go when the weight goes). fbgemm's are packed for the ``x86`` engine, PyTorch's default on
x86: on MiniLM at 32 x 128 tokens the whole model ran 10-30% faster with it than with weights
packed for ``fbgemm``.
"""

from __future__ import annotations

import functools
import threading
import warnings
import weakref
from typing import Any

import torch

from bevel.runtime.ops.quant_format import INT8_MAX, TOKEN_SCALE_EPS, per_token_scale_and_zero

_ZERO_POINT = 128
# calls of fewer rows stay on fbgemm even where oneDNN runs on AMX (decode-sized GEMMs, see above)
ONEDNN_MIN_ROWS = 128
# which integer GEMM runs: "auto" (oneDNN with AMX for calls of ONEDNN_MIN_ROWS rows or more,
# else fbgemm), "fbgemm" or "onednn"
GEMM = "auto"

# id(stored weight) -> (its version, the other tensors it was packed with, the packed weight); an
# entry is dropped when its weight is freed (a WeakKeyDictionary would compare tensors with ==)
_packed_cache: dict[int, tuple[int, tuple[int, ...], "PackedWeight"]] = {}
_scratch = threading.local()


def available() -> bool:
    """Whether this torch build has fbgemm's int8 GEMMs (x86 builds do)."""
    return ("fbgemm" in torch.backends.quantized.supported_engines
            and hasattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32"))


def _cpu_has(feature: str) -> bool:
    check = getattr(torch.cpu, f"_is_{feature}_supported", None)  # private, present since torch 2.3
    return bool(check()) if check is not None else False


def usable_backends() -> list[str]:
    """The integer GEMMs this machine runs exactly: fbgemm, and oneDNN where the CPU has VNNI."""
    backends = ["fbgemm"] if available() else []
    if (backends and torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
            and _cpu_has("vnni")):
        backends.append("onednn")
    return backends


def _backend(rows: int) -> str:
    if GEMM != "auto":
        if GEMM not in usable_backends():
            raise RuntimeError(f"the integer GEMM '{GEMM}' does not run exactly on this machine; "
                               f"usable: {usable_backends()}")
        return GEMM
    if rows >= ONEDNN_MIN_ROWS and _cpu_has("amx_tile") and "onednn" in usable_backends():
        return "onednn"
    return "fbgemm"


class PackedWeight:
    """An int8 [N, K] weight with per-row scales, packed for each integer GEMM when first used."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor) -> None:
        self.qweight, self.scale = qweight.contiguous(), scale.float().contiguous()
        self.packed: dict[str, Any] = {}

    def get(self, backend: str) -> Any:
        """The packed form for "fbgemm", "fbgemm split" (halves of the rows, for where fbgemm
        saturates: see the module docstring) or "onednn"."""
        if backend not in self.packed:
            make = {"fbgemm": lambda: _fbgemm_packed(self.qweight, self.scale),
                    "fbgemm split": self._fbgemm_split, "onednn": self._onednn}[backend]
            self.packed[backend] = make()
        return self.packed[backend]

    def _fbgemm_split(self) -> Any:
        """The rows split in two halves, [-64, 63] above {0, 1}, packed for fbgemm (no bias: callers
        add it). Scales of 1: the halves come back as exact integer sums, so that 2 * high + low then
        rounds once, as fbgemm's own scaling does (how a row's sum splits depends on the weight's other
        rows through its zero-point columns; scaled halves would round differently in a fused layer)."""
        high = torch.div(self.qweight.short(), 2, rounding_mode="floor")
        halves = torch.cat([high, self.qweight.short() - 2 * high]).to(torch.int8)
        return _fbgemm_packed(halves, torch.ones(halves.shape[0]))

    def _onednn(self) -> Any:
        """oneDNN's packed weight with its scales and (zero) zero points."""
        zero_points = torch.zeros(self.qweight.shape[0], dtype=torch.long)
        return torch.ops.onednn.qlinear_prepack(self.qweight, None), self.scale, zero_points


def _fbgemm_packed(weight: torch.Tensor, scale: torch.Tensor) -> Any:
    """int8 ``weight`` [N, K] with per-row ``scale`` packed for fbgemm in the x86 engine."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized-tensor constructors warn that they are deprecated
        quantized = torch._make_per_channel_quantized_tensor(
            weight, scale.double(), torch.zeros(weight.shape[0], dtype=torch.long), 0)
        engine = torch.backends.quantized.engine
        torch.backends.quantized.engine = "x86"
        try:
            return torch.ops.quantized.linear_prepack(quantized, None)
        finally:
            torch.backends.quantized.engine = engine


@functools.cache
def fbgemm_saturates() -> bool:
    """Whether fbgemm's int8 GEMM saturates pairs of products in int16 in this process (CPUs without
    VNNI): one GEMM whose every pair of products is 2 * 255 * 127, checked against its exact sums."""
    rows, columns = 32, 64
    packed = _fbgemm_packed(torch.full((rows, columns), INT8_MAX, dtype=torch.int8), torch.ones(rows))
    codes = torch.full((rows, columns), float(INT8_MAX))  # 255 once the zero point is added
    out = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(codes, 1.0, _ZERO_POINT, packed)
    return not bool((out == columns * INT8_MAX * INT8_MAX).all())


def packed_weight(key: torch.Tensor, companions: tuple[torch.Tensor, ...], make: Any,
                  kind: str = "as stored") -> PackedWeight:
    """The packed weight cached for ``key`` (a stored quantized weight) and its ``companions`` (its
    scales, zero points), made by ``make()`` -> (int8 weight, scale) when missing, when any of
    them was replaced or written to since, or when the cached one was made as another ``kind``
    (e.g. with zero-point columns)."""
    stamp = (kind, *(v for t in companions for v in (id(t), t._version)))
    cached = _packed_cache.get(id(key))
    if cached is not None and cached[0] == key._version and cached[1] == stamp:
        return cached[2]
    packed = PackedWeight(*make())
    if id(key) not in _packed_cache:
        weakref.finalize(key, _packed_cache.pop, id(key), None)
    _packed_cache[id(key)] = (key._version, stamp, packed)
    return packed


def integer_matmul(codes: torch.Tensor, packed: PackedWeight, bits: int = 8) -> torch.Tensor:
    """``codes @ qweight.T * scale`` for float32 codes [M, K] in [-128, 127] (``bits=7``: in [-64, 64]),
    rounded half to even as they are read (the GEMMs quantize their input with scale 1 and zero point
    128, or 64 for 7-bit codes). The codes may be overwritten (oneDNN rounds them in place)."""
    if _backend(codes.shape[0]) == "fbgemm":
        # 7-bit codes, read with zero point 64 as [0, 128], keep every pair of products within int16
        zero_point = _ZERO_POINT if bits == 8 else _ZERO_POINT // 2
        split = bits == 8 and fbgemm_saturates()
        out = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            codes, 1.0, zero_point, packed.get("fbgemm split" if split else "fbgemm"))
        if not split:
            return out
        rows = packed.qweight.shape[0]
        return torch.add(out[:, rows:], out[:, :rows], alpha=2).mul_(packed.scale)
    weight, scale, zero_points = packed.get("onednn")
    return torch.ops.onednn.qlinear_pointwise(_unsigned_codes(codes), 1.0, _ZERO_POINT, weight, scale, zero_points,
                                              None, 1.0, 0, torch.float32, "none", [], "")


def _unsigned_codes(codes: torch.Tensor) -> torch.Tensor:
    """``codes`` rounded half to even and clamped to [-128, 127] as fbgemm reads them, plus the zero
    point 128, as uint8: the int8 byte with its sign bit flipped is the same number plus 128 (plain
    ops instead of the deprecated quantized tensors). ``codes`` are scratch (rounded in place) and the
    result is a reused buffer, valid until the next call."""
    signed = _workspace(*codes.shape, dtype=torch.int8)
    signed.copy_(codes.round_().clamp_(-128, 127))  # integers already: the cast is exact
    return signed.view(torch.uint8).bitwise_xor_(0x80)


def _workspace(rows: int, columns: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A scratch [rows, columns] tensor of this dtype, reused across calls by this thread: fresh
    allocations of activation-sized tensors cost more than the arithmetic done in them (page faults),
    and the GEMMs are done with the codes they are given when they return, so the buffer is free again
    then. One buffer per dtype, as large as the largest call so far, viewed in each call's shape (the
    codes of W8A8 have a width per layer, K plus its zero-point columns)."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < rows * columns:
        buffer = buffers[dtype] = torch.empty(rows * columns, dtype=dtype)
    return buffer[:rows * columns].view(rows, columns)


def _token_peak(x: torch.Tensor) -> torch.Tensor:
    """max |x| of each row [M, 1], at least TOKEN_SCALE_EPS (amax and amin vectorize; aminmax and
    abs().amax() were 4-10x slower here)."""
    return torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg_()).clamp_(min=TOKEN_SCALE_EPS)


def _scale_rows(sums: torch.Tensor, token_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``sums * token_scale + bias``, in place, in one pass over the output (addcmul: on a [4096, 1536]
    output 1.5 ms against 3.4 ms for a multiply then an add)."""
    if bias is None:
        return sums.mul_(token_scale)
    return torch.addcmul(bias.float(), sums, token_scale, out=sums)


def with_zero_point_columns(qweight: torch.Tensor) -> torch.Tensor:
    """int8 ``qweight`` [N, K] followed by J columns whose int8 values sum to minus each row's sum
    (as even as integers allow, so each is within 127 of zero), for :func:`per_token_linear`."""
    negated_sums = -qweight.long().sum(dim=1)
    columns = max(1, -(-int(negated_sums.abs().max()) // INT8_MAX))
    share = torch.div(negated_sums, columns, rounding_mode="floor")
    extra = torch.remainder(negated_sums, columns)
    digits = share[:, None] + (torch.arange(columns)[None, :] < extra[:, None])
    return torch.cat([qweight, digits.to(torch.int8)], dim=1).contiguous()


def per_token_linear(x: torch.Tensor, input_scale: torch.Tensor | None, packed: PackedWeight,
                     bias: torch.Tensor | None, bits: int = 8) -> torch.Tensor:
    """W8A8 of a float [..., K] input (times ``input_scale`` [K] first, if given): per-token asymmetric
    codes of ``bits`` bits (``quant_format``'s rule) times a weight packed from :func:`with_zero_point_columns`,
    float32 result. Each token's zero point fills its codes' extra columns, so the GEMM subtracts
    ``zero * row sum`` exactly. The GEMMs round the codes (half to even, as ``torch.round``) while
    they read them, so they are handed over unrounded."""
    shape = x.shape
    x = x.reshape(-1, shape[-1]).float()
    k = x.shape[1]
    codes = _workspace(x.shape[0], packed.qweight.shape[1])
    body = codes[:, :k]
    if input_scale is not None:
        torch.mul(x, input_scale.float(), out=body)
        x = body
    token_scale, zero = per_token_scale_and_zero(x, bits)
    torch.div(x, token_scale, out=body).add_(zero)
    if bits == 7:  # a code may round up to 64, which the GEMM, clamping at 191 then, would keep
        body.clamp_(max=2 ** (bits - 1) - 1)
    codes[:, k:] = zero
    out = _scale_rows(integer_matmul(codes, packed, bits), token_scale, bias)
    return out.reshape(*shape[:-1], out.shape[-1])


def float_activation_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """A float [..., K] input times an int8 packed weight on integer GEMMs, each token carried as two
    int8 digits (see the module docstring); float32 result."""
    shape = x.shape
    x = x.reshape(-1, shape[-1]).float()
    # where fbgemm saturates, base-128 digits (|high| <= 63, |low| <= 64: read with zero point 64 as
    # at most 128, whose pairs of products stay within int16) run on the whole weight, not split
    narrow = _backend(x.shape[0]) == "fbgemm" and fbgemm_saturates()
    base, bits = (128, 7) if narrow else (256, 8)
    scale = _token_peak(x) / ((base // 2 - 1) * base)
    whole = x / scale
    high = torch.round(whole / base)
    # the GEMM rounds the low digit; with base 256, where it comes out at 128 it is clipped to 127, an
    # error of one unit in 32512 of the token's largest value
    low = whole.add_(high, alpha=-base)
    # two GEMMs: one on twice the rows took 4x as long as one on the rows in fbgemm
    sums = integer_matmul(low, packed, bits).add_(integer_matmul(high, packed, bits), alpha=base)
    out = _scale_rows(sums, scale, bias)
    return out.reshape(*shape[:-1], out.shape[-1])
