"""HF's ``Conv1D`` (GPT-2 and its kin) as Linear layers.

torch.export writes such a layer as ``view(x, [-1, K]) -> addmm(b, ., W) -> view(., [..., N])``
with its weight stored [K, N]. :func:`addmm_as_linear` (a step of ``cleanup``) makes it
``aten.linear(x, W^T, b)`` with the weight stored [N, K], as a Linear stores it, so that the passes
after it see one form of Linear layer (structured pruning's dependency analysis follows only
``aten.linear``). The weight keeps its name. Equal up to the order of float sums in the matrix product.
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
