"""The ONNX bridge: write a compiled graph as ONNX with dynamic batch and sequence axes, checked by onnx.checker."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

import torch
from torch.utils._pytree import keystr, tree_flatten_with_path

from bevel.errors import ExportError
from bevel.ir.capture import auto_dynamic_shapes

if TYPE_CHECKING:
    from bevel.runtime.compiled_module import CompiledModule

DEFAULT_OPSET = 18


def output_names(compiled: "CompiledModule") -> list[str]:
    """Names for the ONNX outputs from the output structure: ``last_hidden_state``, ``output_0``, ..."""
    with torch.no_grad():
        outputs = compiled.graph_module(*compiled.example_inputs)
    names = []
    for i, (path, _) in enumerate(tree_flatten_with_path(outputs)[0]):
        name = re.sub(r"[^0-9A-Za-z_]+", "_", keystr(path)).strip("_")
        names.append(name if name and not name[0].isdigit() else f"output_{name or i}")
    return names


def export_onnx(compiled: "CompiledModule", path: str, opset: int = DEFAULT_OPSET) -> str:
    """Write ``compiled`` as ONNX to ``path`` through ``torch.onnx.export(dynamo=True)``.

    Every input dimension the graph leaves symbolic (batch, sequence) stays dynamic in the ONNX
    model; bevel's custom ops are written with their registered onnxscript translations.
    """
    import onnx

    from bevel.runtime.ops import ONNX_TRANSLATIONS

    if opset < DEFAULT_OPSET:
        raise ExportError(f"opset={opset} is too old: bevel writes ONNX opset {DEFAULT_OPSET} or newer")
    args = compiled.example_inputs
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    try:
        torch.onnx.export(compiled.graph_module, args, path, dynamo=True,
                          dynamic_shapes=auto_dynamic_shapes(args),
                          input_names=[spec["name"] for spec in compiled.input_specs],
                          output_names=output_names(compiled), opset_version=opset,
                          custom_translation_table=dict(ONNX_TRANSLATIONS) or None, verbose=False)
    except Exception as error:  # the exporter raises many types; report one clear error
        raise ExportError(f"could not export the compiled graph to ONNX: {type(error).__name__}: "
                          f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}") from error
    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as error:
        raise ExportError(f"the ONNX model written to '{path}' fails onnx.checker: {error}") from error
    return path
