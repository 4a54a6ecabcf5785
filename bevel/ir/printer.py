"""A readable listing of a graph: one line per node with its shape and dtype, weights shown as @name."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch.utils._pytree import keystr

if TYPE_CHECKING:
    from bevel.ir.graph import Graph

_DTYPE_SHORT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
                torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "bool"}


def type_text(value: Any) -> str:
    """``f32[s0, 128, 384]`` for a tensor, the Python type name otherwise."""
    if isinstance(value, torch.Tensor):
        dtype = _DTYPE_SHORT.get(value.dtype, str(value.dtype).replace("torch.", ""))
        return f"{dtype}[{', '.join(str(d) for d in value.shape)}]"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(type_text(v) for v in value) + ")"
    return type(value).__name__


def _arg_text(arg: Any) -> str:
    if isinstance(arg, fx.Node):
        return f"@{arg.target}" if arg.op == "get_attr" else f"%{arg.name}"
    if isinstance(arg, (list, tuple)):
        return "[" + ", ".join(_arg_text(a) for a in arg) + "]"
    return repr(arg)


def target_text(target: Any) -> str:
    """An op's name without the ``.default`` overload suffix: ``aten.linear``."""
    text = str(target)
    return text[: -len(".default")] if text.endswith(".default") else text


def format_graph(graph: "Graph") -> str:
    """The whole graph, inputs first, get_attr nodes folded into the calls that read them."""
    lines = []
    for node in graph.fx_graph.nodes:
        if node.op == "get_attr":
            continue
        if node.op == "placeholder":
            lines.append(f"input %{node.name}: {type_text(node.meta.get('val'))}")
        elif node.op == "output":
            lines.append(f"return {_arg_text(node.args[0])}")
        else:
            args = [_arg_text(a) for a in node.args]
            args += [f"{k}={_arg_text(v)}" for k, v in node.kwargs.items()]
            lines.append(f"%{node.name}: {type_text(node.meta.get('val'))} = "
                         f"{target_text(node.target)}({', '.join(args)})")
    return "\n".join(lines)


def output_path(path: tuple[Any, ...]) -> str:
    """A readable name for a pytree path: ``last_hidden_state``, ``0``, ``logits.1``."""
    return ".".join(re.sub(r"^\.|^\[|\]$|'", "", keystr((key,))) for key in path)
