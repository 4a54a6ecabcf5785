"""Analyses over a graph: parameter count, bytes, FLOPs per node, and the sparsity of layer weights.

Layer weights are the weight matrices of Linear and Conv layers, and of matmuls by a weight matrix
(linear layers some models write as ``addmm``, such as GPT-2's Conv1D).

FLOPs count multiply-adds as two operations and cover the ops that dominate inference cost:
linear, matmul-family, convolution and scaled-dot-product attention. Symbolic sizes are
evaluated at the example inputs the graph was captured with.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.fx as fx

from bevel.ir.meta import concrete

if TYPE_CHECKING:
    from bevel.ir.graph import Graph

aten = torch.ops.aten

LINEAR_OPS = (aten.linear.default,)
CONV_OPS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
            aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding)
# the ops that give a tensor's elements another shape and nothing else
VIEW_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _shape(node: Any) -> list[int]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else node
    if not isinstance(val, torch.Tensor):
        raise ValueError(f"node {node} has no tensor metadata")
    return [concrete(d) for d in val.shape]


def _numel(shape: list[int]) -> int:
    return math.prod(shape)


def _linear_flops(node: fx.Node) -> int:
    return 2 * _numel(_shape(node)) * _shape(node.args[1])[1]


def matmul_flops(node: fx.Node) -> int:
    """FLOPs of an op that multiplies its first argument [..., K] by a matrix: 2 x outputs x K."""
    return 2 * _numel(_shape(node)) * _shape(node.args[0])[-1]


def _addmm_flops(node: fx.Node) -> int:
    return 2 * _numel(_shape(node)) * _shape(node.args[1])[-1]


def _conv_flops(node: fx.Node) -> int:
    # each output element is a dot product over (in_channels / groups) * kernel elements
    return 2 * _numel(_shape(node)) * _numel(_shape(node.args[1])[1:])


def _attention_flops(node: fx.Node) -> int:
    q, k, v = (_shape(a) for a in node.args[:3])
    batch_heads = _numel(q[:-2])
    return 2 * batch_heads * q[-2] * k[-2] * (q[-1] + v[-1])


_FLOPS: dict[Any, Callable[[fx.Node], int]] = {
    aten.linear.default: _linear_flops,
    aten.matmul.default: matmul_flops,
    aten.mm.default: matmul_flops,
    aten.bmm.default: matmul_flops,
    aten.addmm.default: _addmm_flops,
    aten.baddbmm.default: _addmm_flops,
    aten.scaled_dot_product_attention.default: _attention_flops,
    **{op: _conv_flops for op in CONV_OPS},
}


def flat_outputs(graph: Graph) -> list[Any]:
    """What the graph returns, as the flat list of its output node (the positions the fidelity check counts)."""
    (output,) = graph.nodes(op="output")
    return list(output.args[0]) if isinstance(output.args[0], (tuple, list)) else [output.args[0]]


def descendants(*nodes: fx.Node) -> set[fx.Node]:
    """Every node that reads one of ``nodes``, directly or not."""
    seen, stack = set(), [user for node in nodes for user in node.users]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.users)
    return seen


def ancestors(node: fx.Node, through_sizes: bool = True) -> set[fx.Node]:
    """Every node ``node`` reads, directly or not; without ``through_sizes``, not what it reads only
    the size of (a ``sym_size``'s tensor)."""
    seen, stack = set(), list(node.all_input_nodes)
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            if through_sizes or current.target != aten.sym_size.int:
                stack.extend(current.all_input_nodes)
    return seen


def register_flops(target: Any, count: Callable[[fx.Node], int]) -> None:
    """Teach the FLOP counter a new op (custom ops register their own count here)."""
    _FLOPS[target] = count


def node_flops(node: fx.Node) -> int:
    """FLOPs of one node at the example input sizes; 0 for ops the counter does not model."""
    count = _FLOPS.get(node.target) if node.op == "call_function" else None
    return count(node) if count is not None else 0


def flops_per_node(graph: "Graph") -> dict[str, int]:
    """FLOPs of every node that has any, by node name."""
    result = {}
    for node in graph.nodes(op="call_function"):
        value = node_flops(node)
        if value:
            result[node.name] = value
    return result


def total_flops(graph: "Graph") -> int:
    """FLOPs of one forward call at the example input sizes."""
    return sum(flops_per_node(graph).values())


def op_histogram(graph: "Graph") -> dict[str, int]:
    """How many times each op is called, by op name (``aten.linear``), most frequent first."""
    from collections import Counter

    from bevel.ir.printer import target_text

    counts = Counter(target_text(n.target) for n in graph.nodes(op="call_function"))
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def storage_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    """Equal for two tensors exactly when they are the same data (a tied weight held under two names)."""
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tuple(tensor.stride()), tensor.dtype)


def _unique_tensors(graph: "Graph") -> list[torch.Tensor]:
    seen, tensors = set(), []
    for tensor in graph.tensors().values():
        key = storage_key(tensor)
        if key not in seen:
            seen.add(key)
            tensors.append(tensor)
    return tensors


# ops that read tensors of two 4-bit values per byte (codes and zero points), by their argument positions
PACKED_INT4_SLOTS = {"bevel::int4_weight_linear": (1, 3), "bevel::int4_embedding": (0, 2)}


def _packed_int4_weights(graph: "Graph") -> set[tuple[Any, ...]]:
    """The storage keys of the stored tensors that hold two 4-bit values per byte."""
    packed = set()
    for node in graph.nodes(op="call_function"):
        name = node.target.name() if isinstance(node.target, torch._ops.OpOverload) else None
        for slot in PACKED_INT4_SLOTS.get(name, ()):
            arg = node.args[slot] if len(node.args) > slot else None
            if isinstance(arg, fx.Node) and arg.op == "get_attr":
                packed.add(storage_key(graph.param(arg.target)))
    return packed


def param_count(graph: "Graph") -> int:
    """Number of stored weight values (parameters and buffers, shared tensors counted once): a packed
    4-bit tensor holds two per byte, so quantizing adds to the count only the groups' scales and zero
    points."""
    packed = _packed_int4_weights(graph)
    return sum(t.numel() * (2 if storage_key(t) in packed else 1) for t in _unique_tensors(graph))


def param_bytes(graph: "Graph") -> int:
    """Bytes of stored weights (parameters and buffers, shared tensors counted once)."""
    return sum(t.numel() * t.element_size() for t in _unique_tensors(graph))


# Where the weight sits in ops that multiply their input by a weight matrix: Linear, Conv, and the
# matmul forms some models use for linear layers (HF's Conv1D in GPT-2 is addmm(bias, x, W)).
WEIGHT_SLOTS: dict[Any, int] = {**{op: 1 for op in LINEAR_OPS + CONV_OPS}, aten.addmm.default: 2,
                                aten.mm.default: 1, aten.matmul.default: 1}


def layer_weight(graph: "Graph", node: fx.Node) -> fx.Node | None:
    """The get_attr node of the weight ``node`` multiplies by, if it is a layer with a parameter weight."""
    slot = WEIGHT_SLOTS.get(node.target) if node.op == "call_function" else None
    if slot is None or len(node.args) <= slot:
        return None
    weight = node.args[slot]
    if not graph.is_parameter(weight):
        return None
    if node.target not in LINEAR_OPS + CONV_OPS and graph.param(weight.target).dim() != 2:
        return None  # a matmul with a parameter that is not a weight matrix
    return weight


def layer_weights(graph: "Graph") -> dict[str, torch.Tensor]:
    """Weights of the Linear and Conv layers (and matmuls by a weight matrix) by name."""
    weights = {}
    for node in graph.nodes(op="call_function", target=tuple(WEIGHT_SLOTS)):
        weight = layer_weight(graph, node)
        if weight is not None:
            weights[weight.target] = graph.param(weight.target)
    return weights


def reads_of(user: fx.Node, node: fx.Node) -> int:
    """How many times ``user`` reads ``node`` among its arguments, inside lists and tuples too."""
    found: list[fx.Node] = []
    fx.node.map_arg((user.args, user.kwargs), found.append)
    return sum(1 for n in found if n is node)


def read_counts(graph: "Graph") -> dict[str, int]:
    """How many times each stored tensor is read anywhere in the graph (a tied weight reads more than once,
    and so does one that an op reads inside a list, as ``cat([w, ...])`` does)."""
    counts: dict[str, int] = {}
    for node in graph.nodes(op="get_attr"):
        for user in node.users:
            counts[node.target] = counts.get(node.target, 0) + reads_of(user, node)
    return counts


def weights_read_outside_layers(graph: "Graph") -> set[str]:
    """Names of weights read by anything but the weight slot of a layer (a tied embedding, say)."""
    shared = set()
    for node in graph.nodes(op="get_attr"):
        for user in node.users:
            if layer_weight(graph, user) is not node or reads_of(user, node) > 1:
                shared.add(node.target)
    return shared


def weight_sparsity(graph: "Graph") -> float:
    """Fraction of zeros over all Linear and Conv weights."""
    weights = layer_weights(graph).values()
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / total if total else 0.0
