"""Structural checks run after every pass: a graph that fails them is rolled back."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from bevel.ir.attributes import has_attribute

if TYPE_CHECKING:
    from bevel.ir.graph import Graph


def lint_graph(graph: "Graph") -> list[str]:
    """Problems found in ``graph``, one sentence each: fx's own lint, missing metadata, dangling weights."""
    problems = []
    try:
        graph.fx_graph.lint()
    except Exception as error:  # fx reports malformed graphs with assorted exception types
        problems.append(f"fx lint: {error}")
    for node in graph.fx_graph.nodes:
        if node.op == "get_attr" and not has_attribute(graph.module, node.target):
            problems.append(f"node '{node.name}' reads '{node.target}', which the module does not hold")
        carries_value = node.op in ("placeholder", "call_function") or graph.is_tensor_attr(node)
        if carries_value and node.users and "val" not in node.meta:
            problems.append(f"node '{node.name}' ({node.target}) has no shape/dtype metadata")
    for name, value in graph.tensors().items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            problems.append(f"weight '{name}' holds NaN or infinite values")
    return problems
