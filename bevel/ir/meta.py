"""Shape and dtype metadata on graph nodes: recomputed with fake tensors after every rewrite."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch._guards import detect_fake_mode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

if TYPE_CHECKING:
    from bevel.ir.graph import Graph


def fake_mode_of(graph: "Graph"):
    """The fake-tensor mode the graph was captured under (it owns the symbolic batch/sequence sizes)."""
    values = [n.meta.get("val") for n in graph.inputs()]
    mode = detect_fake_mode([v for v in values if isinstance(v, torch.Tensor)])
    if mode is None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
    return mode


def fake_of(graph: "Graph", value: torch.Tensor) -> Any:
    """A fake tensor standing for ``value`` in the graph's fake mode."""
    return fake_mode_of(graph).from_tensor(value, static_shapes=True)


def propagate(graph: "Graph") -> None:
    """Recompute ``meta["val"]`` of every node from the inputs' (possibly symbolic) fake values."""
    mode = fake_mode_of(graph)
    inputs = []
    for node in graph.inputs():
        val = node.meta.get("val")
        if val is None:
            raise ValueError(f"input '{node.name}' has no recorded example value")
        inputs.append(val)
    allow = mode.allow_non_fake_inputs
    mode.allow_non_fake_inputs = True  # weights are real tensors read through get_attr
    try:
        FakeTensorProp(graph.module, mode=mode).propagate_dont_convert_inputs(*inputs)
    finally:
        mode.allow_non_fake_inputs = allow


def concrete(dim: Any) -> int:
    """An int for a dimension: symbolic sizes give the value they had in the example inputs."""
    if isinstance(dim, torch.SymInt):
        hint = dim.node.hint
        if hint is None:
            raise ValueError(f"size {dim} has no example value")
        return int(hint)
    return int(dim)
