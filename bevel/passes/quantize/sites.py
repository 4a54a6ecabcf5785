"""Where the quantize passes act: the Linear layers and embedding tables of a graph, and how to
swap one for a bevel op.

A Linear is ``aten.linear(x, W, b)`` or ``aten.addmm(b, x, W)`` with ``W`` stored [K, N] (GPT-2's
Conv1D); both become a bevel op on a [N, K] weight. They are found by pattern rules (see
:mod:`bevel.ir.rewrite_rule`; ``bevel inspect MODEL --explain linear`` says why a layer was not).
Weights that something else reads too (a tied embedding and output layer) are left alone, so
quantizing one use never changes the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from bevel.ir.analysis import read_counts
from bevel.ir.graph import Graph
from bevel.ir.rewrite_rule import Match, RewriteRule, describe, register_rule
from bevel.passes.skip_patterns import skipped, unmatched_skip_notes

aten = torch.ops.aten


@dataclass
class LinearSite:
    """One Linear layer: its node, weight as [N, K] and optional bias node."""

    node: fx.Node
    weight_name: str
    weight: torch.Tensor
    bias: fx.Node | None

    @property
    def x(self) -> fx.Node:
        """The layer's input node, read from the node itself: rewriting an earlier site (an embedding
        feeding this layer, say) replaces it."""
        return self.node.args[1] if self.node.target == aten.addmm.default else self.node.args[0]


@dataclass
class EmbeddingSite:
    """One embedding lookup: its node, table name and the indices it reads."""

    node: fx.Node
    weight_name: str
    weight: torch.Tensor
    indices: fx.Node


# a weight other ops read too (a tied embedding and output layer): rewriting one use would change the other
TIED = "its weight is read by more than one op (a tied weight, or a layer called more than once)"


class _StoredWeightRule(RewriteRule):
    """Guards shared by the layer rules: the weight a 2-D float parameter, not skipped, not tied."""

    def __init__(self, skip: tuple[str, ...] = (), readers: dict[str, int] | None = None) -> None:
        self.skip = skip
        self.readers = readers or {}  # how often each stored tensor is read (see read_counts)

    @classmethod
    def for_graph(cls, graph: Graph) -> "_StoredWeightRule":
        """The rule without skip patterns, knowing which of ``graph``'s weights are tied."""
        return cls(readers=read_counts(graph))

    def check_weight(self, m: Match, name: str, float32: bool = False) -> bool:
        """Whether ``name`` bound to a weight the passes may rewrite; refuses the match saying why not."""
        if not m.is_param(name):
            return m.reject(f"{name} is {describe(m.node(name))}, not a stored weight")
        weight = m[name]
        if weight.dim() != 2 or not weight.is_floating_point() or (float32 and weight.dtype != torch.float32):
            return m.reject(f"{name} is a {weight.dim()}-D {weight.dtype} tensor, not a 2-D "
                            f"{'float32' if float32 else 'float'} matrix")
        target = m.node(name).target
        if skipped(target, self.skip):
            return m.reject(f"{target} matches a skip pattern")
        if self.readers.get(target, 0) > 1:
            return m.reject(TIED)
        return True


@register_rule
class LinearLayer(_StoredWeightRule):
    """A Linear layer: ``aten.linear(x, W, b)`` with a stored weight [N, K] and an optional bias."""

    name = "linear"

    def pattern(self, x, w, b):
        return aten.linear.default(x, w, b)

    def check(self, m: Match) -> bool:
        if not isinstance(m.node("x"), fx.Node):
            return m.reject(f"its input is {describe(m.node('x'))}, not a tensor of the graph")
        return self.check_weight(m, "w")

    def site(self, m: Match) -> LinearSite:
        """The matched layer as a site of the passes."""
        return LinearSite(m.anchor, m.node("w").target, m["w"].detach(), m.node("b"))


@register_rule
class AddmmLinearLayer(_StoredWeightRule):
    """A Linear written as ``aten.addmm(b, x, W)`` with ``W`` stored [K, N] (GPT-2's Conv1D) and a 1-D bias."""

    name = "linear.addmm"

    def pattern(self, b, x, w):
        return aten.addmm.default(b, x, w)

    def check(self, m: Match) -> bool:
        if not isinstance(m.node("x"), fx.Node):
            return m.reject(f"its input is {describe(m.node('x'))}, not a tensor of the graph")
        bias = m.node("b")
        shape = m.graph.shape(bias) if isinstance(bias, fx.Node) else None
        if shape is None or len(shape) != 1:
            return m.reject(f"b is {describe(bias)}, not a 1-D bias")
        return self.check_weight(m, "w")

    def site(self, m: Match) -> LinearSite:
        """The matched layer as a site of the passes, its weight transposed to [N, K]."""
        return LinearSite(m.anchor, m.node("w").target, m["w"].detach().t(), m.node("b"))


@register_rule
class EmbeddingTable(_StoredWeightRule):
    """An embedding lookup ``aten.embedding(W, indices)`` in a stored float32 table (the int8 table op
    returns float32, the dtype of fp32 models' tables)."""

    name = "embedding"

    def pattern(self, w, indices, padding_idx, scale_grad_by_freq, sparse):
        return aten.embedding.default(w, indices, padding_idx, scale_grad_by_freq, sparse)

    def check(self, m: Match) -> bool:
        if not isinstance(m.node("indices"), fx.Node):
            return m.reject(f"its indices are {describe(m.node('indices'))}, not a tensor of the graph")
        return self.check_weight(m, "w", float32=True)

    def site(self, m: Match) -> EmbeddingSite:
        """The matched lookup as a site of the passes."""
        return EmbeddingSite(m.anchor, m.node("w").target, m["w"].detach(), m.node("indices"))


def layer_rules(graph: Graph, skip: tuple[str, ...] = (), embeddings: bool = True) -> list[_StoredWeightRule]:
    """The rules that find the layers weight passes act on, guarded by the user's ``skip`` patterns."""
    readers = read_counts(graph)
    rules = [LinearLayer(skip, readers), AddmmLinearLayer(skip, readers)]
    return rules + [EmbeddingTable(skip, readers)] if embeddings else rules


def find_sites(graph: Graph, skip: tuple[str, ...], embeddings: bool,
               left: str = "left in float") -> tuple[list[Any], list[str]]:
    """The Linear (and, with ``embeddings``, embedding) sites to act on, in graph order, and notes on
    tied weights left alone (``left`` says how, in the calling pass's words) and on skip patterns that
    match no weight."""
    rules = {rule.target: rule for rule in layer_rules(graph, skip, embeddings)}
    sites: list[Any] = []
    notes = []
    for node in graph.nodes(op="call_function", target=tuple(rules)):
        rule = rules[node.target]
        m = rule.match_at(graph, node)
        if not isinstance(m, Match):
            continue
        if rule.check(m):
            sites.append(rule.site(m))
        elif m.reason == TIED and f"{m.node('w').target} {left}: {TIED}" not in notes:
            notes.append(f"{m.node('w').target} {left}: {TIED}")  # once, for all the ops reading it
    return sites, notes + unmatched_skip_notes(skip, graph)
