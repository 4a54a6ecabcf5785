"""Where the quantize passes act: the Linear layers and embedding tables of a graph, and how to
swap one for a bevel op.

A Linear is ``aten.linear(x, W, b)`` or ``aten.addmm(b, x, W)`` with ``W`` stored [K, N] (GPT-2's
Conv1D); both become a bevel op on a [N, K] weight. Weights that something else reads too (a
tied embedding and output layer) are left alone, so quantizing one use never changes the other.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from bevel.ir.analysis import read_counts
from bevel.ir.graph import Graph

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


def _float_weight(graph: Graph, node: Any) -> torch.Tensor | None:
    if not graph.is_parameter(node):
        return None
    weight = graph.param(node.target)
    return weight if weight.dim() == 2 and weight.is_floating_point() else None


def _linear_site(graph: Graph, node: fx.Node) -> LinearSite | None:
    if node.target == aten.linear.default and len(node.args) >= 2 and not node.kwargs:
        weight = _float_weight(graph, node.args[1])
        bias = node.args[2] if len(node.args) > 2 else None
        if weight is not None and isinstance(node.args[0], fx.Node):
            return LinearSite(node, node.args[1].target, weight.detach(), bias)
    if node.target == aten.addmm.default and len(node.args) == 3 and not node.kwargs:
        bias, x, stored = node.args
        weight = _float_weight(graph, stored)
        if weight is not None and isinstance(x, fx.Node) and isinstance(bias, fx.Node) \
                and graph.shape(bias) is not None and len(graph.shape(bias)) == 1:
            return LinearSite(node, stored.target, weight.detach().t(), bias)
    return None


def _embedding_site(graph: Graph, node: fx.Node) -> EmbeddingSite | None:
    if node.target != aten.embedding.default:
        return None
    weight = _float_weight(graph, node.args[0])
    if weight is None or weight.dtype != torch.float32 or not isinstance(node.args[1], fx.Node):
        return None  # the int8 table op returns float32, the dtype of fp32 models' tables
    return EmbeddingSite(node, node.args[0].target, weight.detach(), node.args[1])


def skipped(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether a weight name matches one of the user's ``skip`` patterns (fnmatch)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def find_sites(graph: Graph, skip: tuple[str, ...], embeddings: bool) -> tuple[list[Any], list[str]]:
    """The Linear (and, with ``embeddings``, embedding) sites to quantize, and notes on those left alone."""
    readers = read_counts(graph)
    sites: list[Any] = []
    notes = []
    for node in graph.nodes(op="call_function"):
        site = _linear_site(graph, node) or (_embedding_site(graph, node) if embeddings else None)
        if site is None or skipped(site.weight_name, skip):
            continue
        if readers.get(site.weight_name, 0) > 1:
            notes.append(f"{site.weight_name} left in float: it is read by more than one op (a tied weight)")
            continue
        sites.append(site)
    return sites, notes
