"""Linear layers written as matrix products, made ``aten.linear`` (steps of ``cleanup``), so that the
passes after it see one form of Linear layer (structured pruning's dependency analysis and the
quantize passes follow ``aten.linear``):

- HF's ``Conv1D`` (GPT-2 and its kin): torch.export writes such a layer as
  ``view(x, [-1, K]) -> addmm(b, ., W) -> view(., [..., N])`` with its weight stored [K, N]
  (:func:`addmm_as_linear`);
- a weight multiplied by hand, ``x @ W.T (+ b)`` with W stored [N, K] (Falcon's ``FalconLinear``, many
  hand-written models) or ``x @ W (+ b)`` with W stored [K, N] (:func:`matmul_as_linear`).

A weight stored [K, N] is stored again [N, K], as a Linear stores it, under its own name. Equal up to
the order of float sums in the matrix product.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from bevel.ir.analysis import VIEW_OPS, read_counts
from bevel.ir.graph import Graph
from bevel.ir.meta import fake_of

aten = torch.ops.aten


def addmm_as_linear(graph: Graph) -> int:
    """Rewrite every ``addmm`` that is a Linear layer with its own stored weight [K, N] and bias [N] as
    ``aten.linear``, taking the flattening view before it and the view back after it along; returns
    how many were rewritten. Weights read elsewhere too (tied) and scaled products are left alone."""
    readers = read_counts(graph)
    count = 0
    for node in graph.nodes(op="call_function", target=aten.addmm.default):
        bias, flat, weight = node.args
        if node.kwargs or not _own_tensor(graph, weight, readers) or not _own_tensor(graph, bias, readers):
            continue
        w, b = graph.param(weight.target), graph.param(bias.target)
        if w.dim() != 2 or b.dim() != 1 or b.shape[0] != w.shape[1]:
            continue
        x, out = _unflattened(graph, flat, node)
        graph.set_param(weight.target, w.t().contiguous())
        weight.meta["val"] = fake_of(graph, graph.param(weight.target))
        with graph.fx_graph.inserting_before(out):
            linear = graph.fx_graph.call_function(aten.linear.default, (x, weight, bias))
        linear.meta.update(out.meta)  # the same value: shape and dtype of the view (or the product) it replaces
        out.replace_all_uses_with(linear)
        count += 1
    if count:
        graph.fx_graph.eliminate_dead_code()
    return count


def matmul_as_linear(graph: Graph) -> int:
    """Rewrite every ``matmul(x, W.T)`` / ``mm(x, W.T)`` (any spelling of the transpose of a 2-D weight W
    [N, K]) and every ``matmul(x, W)`` (W stored [K, N]) as ``aten.linear(x, W)``, taking along an
    ``add`` of a bias [N] right after it; returns how many were rewritten. Only weights (parameters)
    that no other op reads are taken: a buffer a model multiplies by (a rotation, a table) is no layer."""
    readers = read_counts(graph)
    count = 0
    for node in graph.nodes(op="call_function", target=(aten.matmul.default, aten.mm.default)):
        x, right = node.args
        if node.kwargs or not isinstance(x, fx.Node):
            continue
        weight = _transposed_weight(graph, right, readers)
        if weight is None:
            if not (_own_weight(graph, right, readers) and graph.param(right.target).dim() == 2):
                continue
            weight = right  # stored [K, N]: store it [N, K], as a Linear does
            graph.set_param(weight.target, graph.param(weight.target).t().contiguous())
            weight.meta["val"] = fake_of(graph, graph.param(weight.target))
        bias, out = _added_bias(graph, node, graph.param(weight.target).shape[0], readers)
        with graph.fx_graph.inserting_before(out):
            linear = graph.fx_graph.call_function(aten.linear.default, (x, weight, bias))
        linear.meta.update(out.meta)  # the same value: shape and dtype of the product (or sum) it replaces
        out.replace_all_uses_with(linear)
        count += 1
    if count:
        graph.fx_graph.eliminate_dead_code()
    return count


def products_of_weights_note(graph: Graph, unseen_by: str) -> list[str]:
    """A note naming the ``matmul``/``mm`` nodes that multiply by a weight, as such or transposed (Linear
    layers that ``unseen_by`` until ``cleanup`` makes them ``aten.linear``); empty when there are none."""
    found = []
    for node in graph.nodes(op="call_function", target=(aten.matmul.default, aten.mm.default)):
        right = node.args[1]
        weight = right.args[0] if isinstance(right, fx.Node) and right.target in _TRANSPOSES else right
        if graph.is_parameter(weight) and graph.param(weight.target).dim() == 2:
            found.append(node.name)
    if not found:
        return []
    layers = "1 layer is" if len(found) == 1 else f"{len(found)} layers are"
    return [f"{layers} written as a matrix product with a weight (x @ W.T, as Falcon's), which {unseen_by} "
            f"(first: '{found[0]}'); `cleanup` earlier in the pipeline writes them as Linear layers"]


# the spellings of a 2-D transpose: W.T, W.t(), W.mT, W.transpose(0, 1), W.permute(1, 0)
_TRANSPOSES = (aten.numpy_T.default, aten.t.default, aten.mT.default, aten.transpose.int, aten.permute.default)


def _transposed_weight(graph: Graph, node: Any, readers: dict[str, int]) -> fx.Node | None:
    """The weight W when ``node`` is the transpose of a 2-D weight that nothing else reads, and only one
    op reads that transpose; else None."""
    if not (isinstance(node, fx.Node) and node.target in _TRANSPOSES and len(node.users) == 1):
        return None
    weight = node.args[0]
    if not (_own_weight(graph, weight, readers) and graph.param(weight.target).dim() == 2):
        return None
    if node.target == aten.transpose.int:
        return weight if sorted(d % 2 for d in node.args[1:3]) == [0, 1] else None
    if node.target == aten.permute.default:
        return weight if [d % 2 for d in node.args[1]] == [1, 0] else None
    return weight


def _added_bias(graph: Graph, product: fx.Node, width: int, readers: dict[str, int]) -> tuple[Any, fx.Node]:
    """``(b, add)`` when the product's only user adds a bias ``b`` [width] of its dtype, a weight
    nothing else reads; else ``(None, product)``."""
    users = list(product.users)
    add = users[0] if len(users) == 1 else None
    if add is None or add.target != aten.add.Tensor or add.kwargs or len(add.args) != 2:
        return None, product
    bias = add.args[1] if add.args[0] is product else add.args[0]
    if bias is product or not _own_weight(graph, bias, readers):
        return None, product
    b, out = graph.param(bias.target), product.meta.get("val")
    if b.dim() != 1 or b.shape[0] != width or out is None or b.dtype != out.dtype:
        return None, product
    return bias, add


def _own_weight(graph: Graph, node: Any, readers: dict[str, int]) -> bool:
    """Whether ``node`` reads a parameter that no other op reads."""
    return graph.is_parameter(node) and _own_tensor(graph, node, readers)


def _own_tensor(graph: Graph, node: Any, readers: dict[str, int]) -> bool:
    """Whether ``node`` reads a stored tensor that no other op reads."""
    return graph.is_tensor_attr(node) and readers.get(node.target, 0) == 1


def _unflattened(graph: Graph, flat: fx.Node, product: fx.Node) -> tuple[fx.Node, fx.Node]:
    """The product's input before a flattening view ``[..., K] -> [-1, K]`` and the view that restores
    its leading dims after it, when both are there; else the 2-D input and the product itself."""
    users = list(product.users)
    if not (isinstance(flat, fx.Node) and flat.target in VIEW_OPS and len(users) == 1 and users[0].target in VIEW_OPS):
        return flat, product
    source, back = flat.args[0], users[0]
    before, after = graph.shape(source), graph.shape(back)
    if before is None or after is None or len(before) != len(after) or len(before) < 2:
        return flat, product
    same_rows = all(statically_known_true(a == b) for a, b in zip(before[:-1], after[:-1]))
    if same_rows and statically_known_true(before[-1] == graph.shape(flat)[-1]):
        return source, back
    return flat, product
