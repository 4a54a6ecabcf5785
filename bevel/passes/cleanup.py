"""``cleanup``: remove dropout and identity ops, fold constants, drop dead code. Outputs are unchanged."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from bevel.ir.graph import Graph
from bevel.passes.base import Pass, PassContext, PassParams, PassResult, param
from bevel.passes.registry import register_pass

aten = torch.ops.aten

DROPOUT_OPS = (aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
               aten.feature_alpha_dropout.default)
# Ops that return their first argument unchanged whenever the output has its shape and dtype.
ALWAYS_IDENTITY_OPS = (aten.alias.default, aten.detach.default, aten.clone.default, aten.contiguous.default,
                       aten.lift_fresh_copy.default)
SAME_SHAPE_IDENTITY_OPS = (aten.view.default, aten.reshape.default, aten.expand.default,
                           aten._unsafe_view.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
                           aten._to_copy.default, aten.type_as.default, aten.flatten.using_ints)
_NEUTRAL_SCALARS = {aten.mul.Tensor: 1, aten.mul.Scalar: 1, aten.div.Tensor: 1, aten.div.Scalar: 1,
                    aten.add.Tensor: 0, aten.add.Scalar: 0, aten.sub.Tensor: 0, aten.sub.Scalar: 0}


@register_pass("cleanup")
class Cleanup(Pass):
    """Remove dropout and ops that return their input unchanged, fold subgraphs that depend only on
    constant buffers, and drop dead nodes and unused weights. Exact: outputs do not change."""

    @dataclass
    class Params(PassParams):
        fold_constants: bool = param(True, "evaluate ops whose inputs are all constant buffers once, at compile time")
        max_folded_elements: int = param(1 << 24, "largest tensor (in elements) constant folding may create", ge=0)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        before = len(graph.fx_graph.nodes)
        dropouts = _remove_dropout(graph)
        identities = _remove_identities(graph)
        folded = _fold_constants(graph, self.params.max_folded_elements) if self.params.fold_constants else 0
        graph.refresh()
        removed = before - len(graph.fx_graph.nodes)
        stats = {"dropout_removed": dropouts, "identities_removed": identities, "constants_folded": folded,
                 "nodes_removed": removed}
        return PassResult(changed=removed > 0 or folded > 0, stats=stats)


def _remove_dropout(graph: Graph) -> int:
    count = 0
    for node in graph.nodes(op="call_function", target=DROPOUT_OPS):
        graph.replace_node(node, node.args[0])  # inference: dropout is the identity
        count += 1
    return count


def _same_type(a: Any, b: Any) -> bool:
    """Whether two fake values certainly have the same shape, strides, dtype and device.

    Strides matter: a copy that makes a tensor contiguous is not an identity, since a later view
    may depend on it.
    """
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if a.dtype != b.dtype or a.device != b.device or a.dim() != b.dim():
        return False
    same_shape = all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape))
    return same_shape and all(statically_known_true(x == y) for x, y in zip(a.stride(), b.stride()))


def _is_mutated(node: fx.Node) -> bool:
    """Whether any op writes into ``node``'s tensor (then a copy of it is not an identity)."""
    for user in node.users:
        schema = getattr(user.target, "_schema", None)
        if schema is not None and schema.is_mutable:
            return True
    return False


def _is_identity(node: fx.Node) -> bool:
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    source = node.args[0]
    if not _same_type(node.meta.get("val"), source.meta.get("val")):
        return False
    if node.target in ALWAYS_IDENTITY_OPS or node.target in SAME_SHAPE_IDENTITY_OPS:
        if node.target in (aten.clone.default, aten._to_copy.default, aten.lift_fresh_copy.default):
            return not _is_mutated(node) and not _is_mutated(source)
        return node.target is not aten.to.device or not node.kwargs.get("copy", False)
    if node.target is aten.slice.Tensor:
        return _is_full_slice(node)
    if node.target in _NEUTRAL_SCALARS and len(node.args) >= 2 and not node.kwargs.get("alpha", 1) == 0:
        other = node.args[1]
        return isinstance(other, (int, float)) and not isinstance(other, bool) and other == _NEUTRAL_SCALARS[node.target]
    return False


def _is_full_slice(node: fx.Node) -> bool:
    # the output has the input's shape (checked by the caller); a slice of the full length with step 1
    # starting at 0 is then the identity
    args = list(node.args) + [None] * (5 - len(node.args))
    start, step = args[2], args[4]
    return start in (None, 0) and step in (None, 1)


def _remove_identities(graph: Graph) -> int:
    count = 0
    for node in graph.nodes(op="call_function"):
        if _is_identity(node):
            graph.replace_node(node, node.args[0])
            count += 1
    return count


def _is_foldable_op(node: fx.Node) -> bool:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    if target.namespace not in ("aten", "prims"):
        return False
    if torch.Tag.nondeterministic_seeded in target.tags or target._schema.is_mutable:
        return False
    return isinstance(node.meta.get("val"), torch.Tensor)


def _fold_constants(graph: Graph, max_elements: int) -> int:
    """Evaluate nodes whose inputs are all non-parameter constants (or weights read nowhere else)."""
    values: dict[fx.Node, torch.Tensor] = {}
    from_params: dict[fx.Node, bool] = {}
    for node in graph.nodes(op="get_attr"):
        values[node] = graph.param(node.target)
        from_params[node] = graph.is_parameter(node)
    folded = 0
    for node in graph.nodes(op="call_function"):
        inputs = node.all_input_nodes
        if not inputs or not all(i in values for i in inputs) or not _is_foldable_op(node):
            continue
        if any(from_params[i] and len(i.users) > 1 for i in inputs):
            continue  # folding would keep a second copy of a weight that is still used elsewhere
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
        result = node.target(*args, **kwargs)
        if not isinstance(result, torch.Tensor) or result.numel() > max_elements:
            continue
        result = result.detach().clone()
        is_param = any(from_params[i] for i in inputs)
        replacement = graph.add_param(f"_folded.{node.name}", result, before=node, as_parameter=is_param)
        node.replace_all_uses_with(replacement)
        graph.fx_graph.erase_node(node)
        values[replacement] = result
        from_params[replacement] = is_param
        folded += 1
    return folded
