"""Running a step graph on calibration batches and looking at each layer's attention inputs as it goes
(what ``attention.heads`` and ``attention.block_sparse`` measure)."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx

from bevel.ir.attention import Attention, positions
from bevel.ir.graph import Graph

# called once per layer and batch with the layer's attention and its inputs' values
Visit = Callable[[Attention, dict[str, torch.Tensor]], None]


class _Probe(fx.Interpreter):
    """Keeps the values each attention reads until it runs (the interpreter frees values after their
    last reader), then hands them to ``visit``."""

    def __init__(self, module: fx.GraphModule, attentions: list[Attention], extra: dict[str, fx.Node],
                 visit: Visit) -> None:
        super().__init__(module)
        self.at = {a.node: a for a in attentions}
        self.wanted = {"q": {a.q for a in attentions}, "key": {a.key for a in attentions},
                       "table": {a.table for a in attentions if a.table is not None}}
        self.extra = extra
        self.visit = visit
        self.kept: dict[fx.Node, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if any(n in nodes for nodes in self.wanted.values()) or n in self.extra.values():
            self.kept[n] = result
        attention = self.at.get(n)
        if attention is not None:
            values = {"q": self.kept[attention.q], "key": self.kept[attention.key],
                      **{name: self.kept[node] for name, node in self.extra.items()}}
            if attention.table is not None:
                values["table"] = self.kept[attention.table]
            self.visit(attention, values)
        return result


def visit_attention(graph: Graph, attentions: list[Attention], batches: list[tuple[Any, ...]], visit: Visit) -> None:
    """Run ``graph`` on every batch, calling ``visit(attention, values)`` at each layer's attention with
    the values of ``q``, ``key`` (the cache after the step's write), ``q_positions``, ``kv_positions``
    and, after ``attention.block_sparse``, ``table``."""
    q_positions, kv_positions = positions(graph)
    probe = _Probe(graph.module, attentions, {"q_positions": q_positions, "kv_positions": kv_positions}, visit)
    with torch.no_grad():
        for batch in batches:
            probe.kept.clear()
            probe.run(*batch)
