"""``capture``: turn an nn.Module into a :class:`Graph` through torch.export (non-strict)."""

from __future__ import annotations

import os
import traceback
from typing import Any

import torch

from bevel.errors import CaptureError
from bevel.ir.graph import Graph


def auto_dynamic_shapes(example_inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """Let torch.export decide every dimension of every tensor input (``Dim.AUTO``).

    Dimensions the model does not tie to a constant (batch, sequence, image size) stay symbolic,
    so the graph serves other batch sizes and lengths and exports to ONNX with dynamic axes.
    """
    auto = torch.export.Dim.AUTO
    return tuple({d: auto for d in range(x.dim())} if isinstance(x, torch.Tensor) else None
                 for x in example_inputs)


def capture(model: torch.nn.Module, example_inputs: tuple[Any, ...],
            dynamic_shapes: Any = None) -> Graph:
    """Capture ``model`` called on ``example_inputs`` as a Graph.

    ``dynamic_shapes`` is None (every input dimension may vary where the model allows it),
    ``"static"`` (shapes fixed to the example inputs), or a torch.export ``dynamic_shapes`` spec.
    Raises CaptureError quoting the first failing line of the model's code when torch.export fails.
    The model is not modified.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"expected a torch.nn.Module to capture, got {type(model).__name__}")
    if not isinstance(example_inputs, tuple):
        example_inputs = tuple(example_inputs) if isinstance(example_inputs, list) else (example_inputs,)
    if dynamic_shapes is None:
        dynamic_shapes = auto_dynamic_shapes(example_inputs)
    elif dynamic_shapes == "static":
        dynamic_shapes = None
    try:
        program = torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as error:  # torch.export fails with many exception types; all become one clear error
        raise CaptureError(describe_capture_failure(model, error)) from error
    module = program.module()
    for sub in module.modules():  # eval() is refused on exported modules; the flag still matters to exporters
        sub.training = False
    return Graph(module, example_inputs)


_TORCH_DIR = os.path.dirname(torch.__file__)
_BEVEL_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model_frame(error: BaseException) -> traceback.FrameSummary | None:
    """The deepest traceback frame outside torch and bevel: where the model's own code failed."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not f.filename.startswith((_TORCH_DIR, _BEVEL_DIR)) and "<" not in f.filename]
    return frames[-1] if frames else None


def _suggestion(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    if "data-dependent" in text or "DataDependent" in text or "GuardOnDataDependent" in text:
        return ("the model branches on the values of a tensor; rewrite the branch with torch.where or "
                "torch.cond, or move it out of forward()")
    if "Constraints violated" in text or "specializ" in text:
        return "pass dynamic_shapes=\"static\" to capture with the example input shapes fixed"
    return ("check that the model runs eagerly on example_inputs, call model.eval(), and see "
            "https://pytorch.org/docs/stable/export.html for unsupported Python constructs")


def describe_capture_failure(model: torch.nn.Module, error: BaseException) -> str:
    """A short message: which model, the first line of the error, the failing frame, what to try."""
    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    lines = [f"could not capture {type(model).__name__} with torch.export: {type(error).__name__}: {first_line}"]
    frame = _model_frame(error)
    if frame is not None:
        lines.append(f"  at {frame.filename}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}")
    lines.append(f"  try: {_suggestion(error)}")
    return "\n".join(lines)
