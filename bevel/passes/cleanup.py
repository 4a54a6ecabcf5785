"""``cleanup``: remove dropout and identity ops, fold constants, drop attention masks that mask
nothing, make Linear layers a model writes as matrix products (HF Conv1D, ``x @ W.T + b``) Linear ops (see
:mod:`bevel.passes.linear_from_products`), drop dead code. Outputs are unchanged (up to the order of float
sums where a product becomes a Linear)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int, statically_known_true

from bevel.ir.analysis import ancestors
from bevel.ir.arguments import argument
from bevel.ir.evaluate import evaluate, is_pure, masks_nothing
from bevel.ir.graph import Graph
from bevel.passes.linear_from_products import addmm_as_linear, matmul_as_linear
from bevel.passes.base import Pass, PassContext, PassParams, PassResult, param
from bevel.passes.registry import register_pass

aten = torch.ops.aten

DROPOUT_OPS = (aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
               aten.feature_alpha_dropout.default)
# Ops whose output holds the same values as their first argument whenever it has the same shape,
# strides, dtype and device. The copying ones return fresh memory, the others alias their input.
COPYING_IDENTITY_OPS = (aten.clone.default, aten._to_copy.default, aten.lift_fresh_copy.default)
ALIASING_IDENTITY_OPS = (aten.alias.default, aten.detach.default, aten.contiguous.default, aten.view.default,
                         aten.reshape.default, aten.expand.default, aten._unsafe_view.default, aten.to.dtype,
                         aten.to.dtype_layout, aten.to.device, aten.type_as.default, aten.flatten.using_ints,
                         aten.slice.Tensor)
# x * 1, x / 1, x + 0, x - 0: values unchanged, in fresh memory
_NEUTRAL_SCALARS = {aten.mul.Tensor: 1, aten.mul.Scalar: 1, aten.div.Tensor: 1, aten.div.Scalar: 1,
                    aten.add.Tensor: 0, aten.add.Scalar: 0, aten.sub.Tensor: 0, aten.sub.Scalar: 0}


@register_pass("cleanup")
class Cleanup(Pass):
    """Remove dropout and ops that return their input unchanged, fold subgraphs that depend only on
    constant buffers, make Linear layers written as matrix products Linear ops, and drop dead nodes and
    unused weights. Exact: outputs do not change (up to the order of float sums in a rewritten product)."""

    @dataclass
    class Params(PassParams):
        fold_constants: bool = param(True, "evaluate ops whose inputs are all constant buffers once, at compile time")
        max_folded_elements: int = param(1 << 24, "largest tensor (in elements) constant folding may create", ge=0)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        before = len(graph.fx_graph.nodes)
        dropouts = _remove_dropout(graph)
        graph_mutates = _mutates(graph)  # removing identities and dropout adds or removes no writes
        identities = _remove_identities(graph, graph_mutates)
        # before folding, which would store a weight's transpose under a new name (``<name>_folded``)
        products = matmul_as_linear(graph)
        fold = self.params.fold_constants and not graph_mutates  # a buffer written in place is no constant
        folded = _fold_constants(graph, self.params.max_folded_elements) if fold else 0
        masks = 0 if graph_mutates else _drop_masks_that_mask_nothing(graph)  # a written buffer is no constant
        linears = addmm_as_linear(graph)
        graph.refresh()
        removed = before - len(graph.fx_graph.nodes)
        stats = {"dropout_removed": dropouts, "identities_removed": identities, "constants_folded": folded,
                 "masks_dropped": masks, "linears_from_addmm": linears, "linears_from_matmul": products,
                 "nodes_removed": removed}
        return PassResult(changed=removed > 0 or folded > 0 or masks > 0 or linears + products > 0, stats=stats)


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


def _mutates(graph: Graph) -> bool:
    """Whether any op in the graph writes into a tensor in place."""
    for node in graph.nodes(op="call_function"):
        schema = getattr(node.target, "_schema", None)
        if schema is not None and schema.is_mutable:
            return True
    return False


def _is_copy(node: fx.Node) -> bool:
    """Whether the op returns fresh memory (removing it would make its users share its input's)."""
    return (node.target in COPYING_IDENTITY_OPS or node.target in _NEUTRAL_SCALARS
            or bool(argument(node, "copy", False)))


def _keeps_values(node: fx.Node) -> bool:
    """Whether the op's output has its first argument's values (given equal shape, strides and dtype)."""
    if node.target in COPYING_IDENTITY_OPS:
        return True
    if node.target in ALIASING_IDENTITY_OPS:
        return node.target is not aten.slice.Tensor or _is_full_slice(node)
    if node.target in _NEUTRAL_SCALARS and len(node.args) >= 2 and argument(node, "alpha", 1) == 1:
        other = node.args[1]
        is_number = isinstance(other, (int, float)) and not isinstance(other, bool)
        return is_number and other == _NEUTRAL_SCALARS[node.target]
    return False


def _is_identity(node: fx.Node, graph_mutates: bool) -> bool:
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if not _same_type(node.meta.get("val"), node.args[0].meta.get("val")) or not _keeps_values(node):
        return False
    if _is_copy(node):
        # A copy is only redundant if nothing writes into either side, and if it is not returned:
        # an output must not become the caller's input tensor or a weight.
        return not graph_mutates and not any(user.op == "output" for user in node.users)
    return True


def is_alias_of_input(node: fx.Node) -> bool:
    """Whether ``node`` returns its first argument itself: an aliasing op that changes nothing (a cast
    to the same dtype, a view to the same shape). Re-tracing a graph makes later readers of a
    tensor read such an alias instead."""
    return (node.op == "call_function" and node.target in ALIASING_IDENTITY_OPS and bool(node.args)
            and isinstance(node.args[0], fx.Node) and _same_type(node.meta.get("val"), node.args[0].meta.get("val"))
            and _keeps_values(node))


def _is_full_slice(node: fx.Node) -> bool:
    # the output has the input's shape (checked by the caller); a slice of the full length with step 1
    # starting at 0 is then the identity
    return argument(node, "start", None) in (None, 0) and argument(node, "step", 1) in (None, 1)


def _remove_identities(graph: Graph, graph_mutates: bool) -> int:
    count = 0
    for node in graph.nodes(op="call_function"):
        if _is_identity(node, graph_mutates):
            graph.replace_node(node, node.args[0])
            count += 1
    return count


def _is_foldable_op(node: fx.Node) -> bool:
    return is_pure(node.target) and isinstance(node.meta.get("val"), torch.Tensor)


def _fold_constants(graph: Graph, max_elements: int) -> int:
    """Evaluate nodes whose inputs are all non-parameter constants (or weights read nowhere else).

    A folded result is stored next to the tensor it came from (``<name>_folded``), so it keeps a
    name the user recognizes in reports and ``skip`` patterns.
    """
    values: dict[fx.Node, torch.Tensor] = {}
    from_params: dict[fx.Node, bool] = {}
    origin: dict[fx.Node, str] = {}
    readers: dict[str, int] = {}
    for node in graph.nodes(op="get_attr"):
        if not graph.is_tensor_attr(node):
            continue  # a higher-order op's subgraph, not a constant
        values[node] = graph.param(node.target)
        from_params[node] = graph.is_parameter(node)
        origin[node] = node.target
        readers[node.target] = readers.get(node.target, 0) + len(node.users)
    folded = 0
    for node in graph.nodes(op="call_function"):
        inputs = node.all_input_nodes
        if not inputs or not all(i in values for i in inputs) or not _is_foldable_op(node):
            continue
        if any(user.op == "output" for user in node.users):
            continue  # a returned constant would hand the caller the graph's own tensor
        if any(from_params[i] and readers.get(i.target, 0) > 1 for i in inputs):
            continue  # folding would keep a second copy of a weight that is still used elsewhere
        if not is_concrete_int(node.meta["val"].numel()) or int(node.meta["val"].numel()) > max_elements:
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
        result = node.target(*args, **kwargs)
        if not isinstance(result, torch.Tensor):
            continue
        result = result.detach().clone()
        is_param = any(from_params[i] for i in inputs)
        replacement = graph.add_param(f"{origin[inputs[0]]}_folded", result, before=node, as_parameter=is_param)
        node.replace_all_uses_with(replacement)
        graph.fx_graph.erase_node(node)
        values[replacement] = result
        from_params[replacement] = is_param
        origin[replacement] = origin[inputs[0]]
        readers[replacement.target] = len(replacement.users)
        folded += 1
    return folded


def _drop_masks_that_mask_nothing(graph: Graph) -> int:
    """Take away the attention masks that let every query see every key: a constant (computed from
    neither the inputs nor any size, as the all-true mask HF's ViT builds from ``arange``), maybe
    broadcast to the batch by ``expand`` or reshaped, that is all true (boolean) or all zero (added).
    Attention without a mask computes the same, on the CPU faster, and the token passes then find a
    block with no mask. A mask that reads any size is kept: its values may change with it."""
    dropped = 0
    for attention in graph.nodes(op="call_function", target=aten.scaled_dot_product_attention.default):
        mask = argument(attention, "attn_mask", None)
        if not isinstance(mask, fx.Node):
            continue
        source = mask
        while source.target in _BROADCASTS and isinstance(source.args[0], fx.Node):
            source = source.args[0]
        value = _constant_value(graph, source)
        if value is None or not masks_nothing(value):
            continue
        if "attn_mask" in attention.kwargs:
            attention.update_kwarg("attn_mask", None)
        else:
            attention.update_arg(3, None)
        dropped += 1
    return dropped


# ops that only broadcast or rearrange a mask's values: it masks nothing if what they read masks nothing
_BROADCASTS = (aten.expand.default, aten.unsqueeze.default, aten.view.default, aten.reshape.default,
               aten._unsafe_view.default)


def _constant_value(graph: Graph, node: fx.Node) -> torch.Tensor | None:
    """The value of ``node`` where it reads no input, no size and no buffer the graph writes to, from
    plain deterministic aten ops; None otherwise."""
    needed = ancestors(node) | {node}
    if any(n.op == "placeholder" or isinstance(n.meta.get("val"), torch.SymInt) for n in needed):
        return None
    return evaluate(graph, node, {})
