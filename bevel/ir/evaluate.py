"""Computing one node of a graph eagerly, from values given for the inputs it reads: a constant
(``cleanup`` folds it), or an attention mask from a padding input set to ones (the token passes check
that it is a padding mask and nothing more)."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from bevel.ir.analysis import ancestors
from bevel.ir.graph import Graph


def is_pure(target: Any) -> bool:
    """Whether ``target`` is an aten or prims op that neither draws random numbers nor writes its inputs."""
    return isinstance(target, torch._ops.OpOverload) and target.namespace in ("aten", "prims") \
        and torch.Tag.nondeterministic_seeded not in target.tags and not target._schema.is_mutable


def evaluate(graph: Graph, node: fx.Node, inputs: dict[fx.Node, torch.Tensor]) -> torch.Tensor | None:
    """The value of ``node``, computed by running its ancestors (sizes included) from ``inputs`` (a value
    per placeholder it reads, which ops may write into) and the stored tensors; None where that needs
    anything else: an input not given, a module or a non-aten op, an op that draws random numbers, or one
    that writes its inputs where a stored tensor is read (it could be writing that tensor)."""
    needed = ancestors(node, through_sizes=True) | {node}
    reads_stored = any(n.op == "get_attr" for n in needed)
    values: dict[fx.Node, Any] = {}
    for current in graph.nodes():
        if current not in needed:
            continue
        if current.op == "placeholder" and current in inputs:
            values[current] = inputs[current]
        elif current.op == "get_attr" and graph.is_tensor_attr(current):
            values[current] = graph.param(current.target)
        elif current.op == "call_function" and (is_pure(current.target) or current.target in _SIZE_ARITHMETIC
                                                or (not reads_stored and _writes_fresh_tensors(current.target))):
            args, kwargs = fx.node.map_arg((current.args, current.kwargs), lambda n: values[n])
            values[current] = current.target(*args, **kwargs)
        else:
            return None
    value = values[node]
    return value if isinstance(value, torch.Tensor) else None


def masks_nothing(mask: torch.Tensor) -> bool:
    """Whether an attention mask's value lets every query see every key: all true (boolean) or all zero
    (added to the scores)."""
    return bool(mask.all()) if mask.dtype == torch.bool else bool((mask == 0).all())


# what graphs compute sizes with (``s0 * 4``, ``s1 // 2``)
_SIZE_ARITHMETIC = (operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
                    operator.neg, operator.pow, torch.sym_max, torch.sym_min, torch.sym_float, torch.sym_int)


def _writes_fresh_tensors(target: Any) -> bool:
    """Whether ``target`` is a deterministic aten op that writes its inputs (``masked_fill_`` on the
    ``zeros_like`` it just made, as nn.MultiheadAttention builds its mask)."""
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "aten" \
        and torch.Tag.nondeterministic_seeded not in target.tags


def example_of(node: fx.Node) -> torch.Tensor | None:
    """Zeros of a placeholder's dtype and of the sizes of the example it was captured with; None where
    its recorded value is no tensor or a size has no example value."""
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return None
    sizes = []
    for size in value.shape:
        hint = size if isinstance(size, int) else getattr(size.node, "hint", None)
        if hint is None:
            return None
        sizes.append(int(hint))
    return torch.zeros(sizes, dtype=value.dtype)
