"""The repeated blocks of a captured model (transformer layers) and where the residual stream enters
and leaves each one.

torch.export records, for every node, the stack of modules it was traced in (``nn_module_stack``). A
block is a child of a module list with at least two numbered children (``encoder.layer.3``,
``model.layers.7``, ``blocks.0``, ``h.2``); the outermost such list is taken. A block can be removed
when its nodes hand exactly one tensor to the rest of the graph, the hidden state, besides writes
into a KV cache input (a decoder's step graph); the hidden state entering it is the one outside
tensor it reads with that same shape and dtype.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from bevel.ir.graph import Graph

_NUMBERED = re.compile(r"^(.*)\.(\d+)$")


@dataclass
class Block:
    """One repeated block: its nodes and the residual stream around it."""

    index: int
    path: str                                   # the module path, e.g. "model.model.layers.3"
    nodes: list[fx.Node]
    hidden_in: fx.Node | None = None            # None when the block cannot be removed (see ``problem``)
    hidden_out: fx.Node | None = None
    cache_writes: list[fx.Node] = field(default_factory=list)  # index_copy of a cache input, read outside
    problem: str = ""


def _module_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [value[0] for value in stack.values() if isinstance(value, tuple) and isinstance(value[0], str)]


def find_blocks(graph: Graph) -> list[Block]:
    """The repeated blocks in graph order, each with its residual input and output (or a ``problem``
    saying why it cannot be removed); an empty list when the graph has no repeated blocks."""
    members: dict[str, dict[int, list[fx.Node]]] = defaultdict(lambda: defaultdict(list))
    depth: dict[str, int] = {}
    for node in graph.nodes(op="call_function"):
        for level, path in enumerate(_module_paths(node)):
            found = _NUMBERED.match(path)
            if found:
                prefix = found.group(1)
                members[prefix][int(found.group(2))].append(node)
                depth[prefix] = min(depth.get(prefix, level), level)
    lists = [prefix for prefix, children in members.items() if len(children) >= 2]
    if not lists:
        return []
    prefix = min(lists, key=lambda p: (depth[p], -len(members[p])))  # the outermost list
    return [_bounded(Block(index, f"{prefix}.{index}", nodes))
            for index, nodes in sorted(members[prefix].items())]


def _is_cache_write(node: fx.Node) -> bool:
    return (node.target == torch.ops.aten.index_copy.default and isinstance(node.args[0], fx.Node)
            and node.args[0].op == "placeholder")


def _bounded(block: Block) -> Block:
    inside = set(block.nodes)
    leaving = [n for n in block.nodes if any(u not in inside for u in n.users)]
    block.cache_writes = [n for n in leaving if _is_cache_write(n)]
    hidden = [n for n in leaving if n not in block.cache_writes]
    if len(hidden) != 1:
        block.problem = (f"{block.path} hands {len(hidden)} tensors to the rest of the graph "
                         f"({', '.join(n.name for n in hidden[:4])}), not one hidden state")
        return block
    out = hidden[0]
    entering = {a for n in block.nodes for a in n.all_input_nodes if a not in inside}
    value = out.meta.get("val")
    same = [a for a in entering if _same_kind(a.meta.get("val"), value)]
    if len(same) != 1:
        block.problem = (f"{block.path} reads {len(same)} outside tensors shaped like its output {out.name}; "
                         f"its residual input is ambiguous")
        return block
    block.hidden_in, block.hidden_out = same[0], out
    return block


def _same_kind(a: object, b: object) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
            and a.is_floating_point() and a.dim() == b.dim()
            and all(x is y or str(x) == str(y) for x, y in zip(a.shape, b.shape)))
