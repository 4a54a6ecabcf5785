"""bevel's custom ops (``torch.ops.bevel.*``), each with a reference, a fake, a Triton and an ONNX face.

Importing this package registers them; ``ONNX_TRANSLATIONS`` maps each op to its onnxscript
translation for ``export_onnx``.
"""

from typing import Any, Callable

# op overload -> onnxscript function, filled in by the modules that define ops
ONNX_TRANSLATIONS: dict[Any, Callable[..., Any]] = {}
