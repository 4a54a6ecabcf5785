"""Quantized linears that read the same input become one op: attention's query, key and value, a
gated MLP's gate and up projections.

Their weights are stacked along the output rows (every quantized format here keeps one row per
output feature), so the fused op computes exactly what the separate ones did: the same input
quantization (per token, or two digits per token) and the same integer sums per row. It quantizes
the input once instead of once per layer and runs one wider GEMM; its output is split back into the
layers' outputs. MiniLM's query/key/value at 4096 tokens, W8A8 on a 2-core CPU with AMX, the CPU
path called alone: three calls 9.0 ms, one fused call 3.3 ms; in the whole model's forward (an A/B in
one process) the fused graph was 1-3% faster: its time is mostly elsewhere.

Layers fuse only when every argument that is not per output row is the same: the input, a group
size, and a smoothing factor (``quantize.int8_dynamic`` computes one factor for the siblings).
"""

from __future__ import annotations

import operator
from collections import defaultdict
from typing import Any

import torch
import torch.fx as fx

from bevel.ir.analysis import VIEW_OPS
from bevel.ir.graph import Graph

aten = torch.ops.aten

# per fusable op: the argument positions holding one row per output feature, stacked along dim 0 (a
# missing bias becomes zeros); every other argument must be the same for all siblings
ROW_ARGUMENTS = {
    torch.ops.bevel.int8_weight_linear.default: (1, 2, 3),
    torch.ops.bevel.int8_dynamic_linear.default: (1, 2, 3),
    torch.ops.bevel.int4_weight_linear.default: (1, 2, 3, 5),
}


def fuse_siblings(graph: Graph, nodes: list[fx.Node]) -> list[list[fx.Node]]:
    """Fuse the nodes among ``nodes`` (quantized linear ops) that read the same input with the same
    shared arguments; returns the groups fused (the original nodes, now erased). The caller
    refreshes the graph."""
    groups: dict[Any, list[fx.Node]] = defaultdict(list)
    for node in nodes:
        if node.target in ROW_ARGUMENTS:
            groups[_signature(graph, node)].append(node)
    fused = [group for group in groups.values() if len(group) > 1]
    for group in fused:
        _fuse(graph, group)
    return fused


def _signature(graph: Graph, node: fx.Node) -> tuple[Any, ...]:
    """What siblings must share: the op and every argument not per output row (tensors by value)."""
    rows = ROW_ARGUMENTS[node.target]
    shared: list[Any] = [node.target]
    for index, arg in enumerate(node.args):
        if index in rows:
            continue
        if graph.is_tensor_attr(arg):
            tensor = graph.param(arg.target)
            shared.append(("tensor", tuple(tensor.shape), tensor.dtype, tensor.detach().cpu().numpy().tobytes()))
        else:
            shared.append(arg)
    return tuple(shared)


def _fuse(graph: Graph, group: list[fx.Node]) -> None:
    order = {n: i for i, n in enumerate(graph.fx_graph.nodes)}
    group = sorted(group, key=order.__getitem__)
    first = group[0]
    rows = ROW_ARGUMENTS[first.target]
    sizes = [int(graph.param(n.args[1].target).shape[0]) for n in group]
    args = list(first.args)
    for index in rows:
        sources = [n.args[index] if index < len(n.args) else None for n in group]
        if all(source is None for source in sources):
            continue  # no sibling has a bias
        parts = [None if source is None else graph.param(source.target) for source in sources]
        dtype = next(p.dtype for p in parts if p is not None)
        parts = [torch.zeros(size, dtype=dtype) if p is None else p for p, size in zip(parts, sizes)]
        names = [f"{n.args[1].target}_bias" if source is None else source.target for n, source in zip(group, sources)]
        args[index] = graph.add_param(_fused_name(names), torch.cat(parts), before=first)
    stack = {k: v for k, v in first.meta.items() if k in ("nn_module_stack", "stack_trace")}
    with graph.fx_graph.inserting_before(first):
        fused = graph.fx_graph.call_function(first.target, tuple(args))
        split = graph.fx_graph.call_function(aten.split_with_sizes.default, (fused, sizes, -1))
        outputs = [graph.fx_graph.call_function(operator.getitem, (split, i)) for i in range(len(group))]
    for new in (fused, split, *outputs):
        new.meta.update(stack)
    for node, output in zip(group, outputs):
        if not _read_through_views(graph, node):
            # a split-off output is a strided view of the fused one; a consumer that may need it
            # contiguous gets its own copy
            with graph.fx_graph.inserting_after(output):
                copy = graph.fx_graph.call_function(aten.clone.default, (output,),
                                                    {"memory_format": torch.contiguous_format})
            copy.meta.update(stack)
            output = copy
        graph.replace_node(node, output)


def _fused_name(names: list[str]) -> str:
    """The siblings' weight names joined where they differ: ``a.query.weight`` and ``a.key.weight``
    give ``a.query_key.weight``."""
    split = [name.split(".") for name in names]
    for i, parts in enumerate(zip(*split)):
        if len(set(parts)) > 1:
            rest = {tuple(s[i + 1:]) for s in split}
            if len(rest) == 1:
                return ".".join(split[0][:i] + ["_".join(parts)] + split[0][i + 1:])
            break
    return f"{names[0]}_fused"


def _read_through_views(graph: Graph, node: fx.Node) -> bool:
    """Whether every user of ``node`` is a view or reshape that keeps all of its leading dims (and so
    works on a slice of the last dim). A linear's leading dims are its input's."""
    shape = graph.shape(node.args[0])
    if shape is None or not node.users:
        return False
    lead = [str(d) for d in shape[:-1]]
    for user in node.users:
        out = graph.shape(user)
        if user.target not in VIEW_OPS or out is None or [str(d) for d in out[:len(lead)]] != lead:
            return False
    return True
