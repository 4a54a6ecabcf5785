"""The repeated blocks of a captured model (transformer layers) and where the residual stream enters
and leaves each one.

torch.export records, for every node, the stack of modules it was traced in (``nn_module_stack``). A
block is a child of a module list with at least two numbered children (``encoder.layer.3``,
``model.layers.7``, ``blocks.0``, ``h.2``, ``layers.0`` of ``layers.0.attn`` where the block is a
ModuleDict that is never called itself, or children numbered after a common stem, as torchvision names
them: ``encoder.layers.encoder_layer_4``); the outermost such list with a block that can be removed
is taken (a list of plain layers, such as an MLP's Sequential, has none). A block can be removed
when its nodes hand exactly one tensor to the rest of the graph, the hidden state, besides writes
into a KV cache input (a decoder's step graph); the hidden state entering it is the one outside
tensor it reads with that same shape and dtype; and the hidden state leaving it is the one entering
plus what the block adds, through at least one residual add, and norms and casts (see :func:`_residual`).
A list of plain layers (an ``nn.Sequential`` of Linear, GELU and Dropout) is not a list of blocks:
dropping one of its layers would not leave the residual stream as it was (a Dropout hands its input on
unchanged but adds nothing to it either: it is no residual block).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from bevel.ir.analysis import VIEW_OPS
from bevel.ir.graph import Graph

# a numbered path segment, its number alone or after a stem ("encoder_layer_4"): the list is the path
# up to the number, the block the path with it
_NUMBERED = re.compile(r"\.(?:[A-Za-z_]\w*_)?(\d+)(?=\.|$)")
aten = torch.ops.aten
# ops through which the hidden state leaving a residual block still carries the one entering it
_RESIDUAL_ADDS = (aten.add.Tensor,)
_NORMS = (aten.layer_norm.default, aten.rms_norm.default)
# ops that hand their input on unchanged in value (casts, copies, dropout in eval)
_SAME_VALUE = (aten.to.dtype, aten._to_copy.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
               aten.detach.default, aten.dropout.default)


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
        seen = set()
        for path in _module_paths(node):
            for found in _NUMBERED.finditer(path):
                prefix, index = path[:found.start(1)], int(found.group(1))
                if (prefix, index) not in seen:  # a node is one member of a block however deep its module
                    seen.add((prefix, index))
                    members[prefix][index].append(node)
                    depth[prefix] = prefix.count(".")
    lists = sorted((prefix for prefix, children in members.items() if len(children) >= 2),
                   key=lambda p: (depth[p], -len(members[p])))  # the outermost first
    found_blocks = [[_bounded(Block(index, f"{prefix}{index}", nodes))
                     for index, nodes in sorted(members[prefix].items())] for prefix in lists]
    # the outermost list with a removable block; else the outermost, whose problems the passes report
    return next((blocks for blocks in found_blocks if any(not b.problem for b in blocks)),
                found_blocks[0] if found_blocks else [])


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
    if not _residual(out, same[0], inside):
        block.problem = (f"{block.path} is not a residual block: its output {out.name} is not its input "
                         f"{same[0].name} plus what it computes (through adds, norms, casts and views that keep the "
                         f"hidden size), so removing it would change what the next layer reads")
        return block
    block.hidden_in, block.hidden_out = same[0], out
    return block


def _residual(out: fx.Node, hidden_in: fx.Node, inside: set[fx.Node]) -> bool:
    """Whether ``out`` carries ``hidden_in`` through the block's residual adds, norms and casts alone (a
    transformer layer: ``x + f(x)``, or a norm of it as in post-norm BERT), not through a layer that
    transforms it (a Linear, an activation), and through at least one add (a lone Dropout adds nothing)."""
    frontier = [(out, False)]  # a node, and whether the way from ``out`` to it passed a residual add
    while frontier:
        node, added = frontier.pop()
        if node is hidden_in:
            if added:
                return True
            continue
        if node not in inside or node.op != "call_function":
            continue
        if node.target in _RESIDUAL_ADDS:
            frontier += [(a, True) for a in node.args[:2] if isinstance(a, fx.Node)]
        elif node.target in _NORMS or node.target in _SAME_VALUE or _keeps_rows(node):
            frontier.append((node.args[0], added))
    return False


def _keeps_rows(node: fx.Node) -> bool:
    """A view that keeps the last dimension: OPT runs its FFN on ``[batch * tokens, hidden]`` rows and
    views the sum back to ``[batch, tokens, hidden]``; every element keeps its value and its hidden unit."""
    if node.target not in VIEW_OPS:
        return False
    before, after = node.args[0].meta.get("val"), node.meta.get("val")
    return (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and before.dim() >= 1
            and after.dim() >= 1 and str(before.shape[-1]) == str(after.shape[-1]))


def _same_kind(a: object, b: object) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
            and a.is_floating_point() and a.dim() == b.dim()
            and all(x is y or str(x) == str(y) for x, y in zip(a.shape, b.shape)))
