"""bevel's custom ops (``torch.ops.bevel.*``), each with a reference, a fake, a Triton and an ONNX face.

Importing this package registers them; :func:`onnx_translations` maps each op to its onnxscript
translation for ``export_onnx``.
"""

from typing import Any, Callable

# op overload -> onnxscript function, filled in by the modules that define translations (see onnx_translations)
ONNX_TRANSLATIONS: dict[Any, Callable[..., Any]] = {}

from bevel.ir.analysis import matmul_flops, register_flops  # noqa: E402
from bevel.runtime.ops import int4_embedding, int4_weight_linear, int8_dynamic_linear, int8_embedding  # noqa: E402,F401
from bevel.runtime.ops import int8_weight_linear  # noqa: E402,F401
from bevel.runtime.ops import semi_structured_linear  # noqa: E402,F401
from bevel.runtime.ops import packed_token_merge, sequence_pack, token_merge  # noqa: E402,F401
from bevel.runtime.ops import attention_blocks, cache_attention, kv_quant, sparse_attention  # noqa: E402,F401

for _linear in (int8_weight_linear.int8_weight_linear, int4_weight_linear.int4_weight_linear,
                int8_dynamic_linear.int8_dynamic_linear):
    register_flops(_linear._opoverload, matmul_flops)


def onnx_translations() -> dict[Any, Callable[..., Any]]:
    """Each op overload with an ONNX face -> its onnxscript translation. The translations import
    onnxscript, which takes a second or two, so they load on the first ONNX export rather than with
    the ops (every ``import bevel`` and every CLI command would pay for it)."""
    from bevel.runtime import early_exit_onnx  # noqa: F401
    from bevel.runtime.ops import (attention_onnx, gelu_onnx, quant_onnx, sdpa_onnx,  # noqa: F401
                                   semi_structured_onnx, token_merge_onnx)

    return ONNX_TRANSLATIONS
