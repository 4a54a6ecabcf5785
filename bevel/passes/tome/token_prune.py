"""``token_prune``: training-free token pruning (the HiPrune / Zero-TPrune family) as a graph rewrite:
after the attention of each transformer block, the tokens that receive the least attention are dropped.

A token's importance is the attention it receives, averaged over heads: from the first (CLS) query
(``importance="cls"``, for classification-style outputs read from that token) or the mean over
every real query (``importance="mean"``). The plan is made of plain aten ops in the graph (no new op): the
rank of each token's removal score, and ``dest``/``weight`` for ``bevel::merge_tokens``, where each dropped
token goes with weight 0 to the slot of the kept token before it, so the merge only gathers the kept
tokens. The count is ``r`` per block, as in ``tome``, clamped the same way at run time (at most half
of the unprotected tokens), since that clamp fixes the merged length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from bevel.ir.arguments import argument
from bevel.ir.graph import Graph
from bevel.passes.base import Pass, PassContext, PassResult, param
from bevel.passes.registry import register_pass
from bevel.passes.tome.blocks import AttentionBlock
from bevel.passes.tome.merge import TokenReductionParams, run_planned
from bevel.passes.tome.rewrite import Inserter
from bevel.runtime.ops.token_merge import PADDING_SCORE

aten = torch.ops.aten


def positions(at: Inserter, size: fx.Node) -> fx.Node:
    """Each token's index [B, N] (int64), made from ``size`` so that it follows its device and shape."""
    ones = at(aten.ones_like.default, size, dtype=torch.int64)
    return at(aten.sub.Tensor, at(aten.cumsum.default, ones, 1), 1)


def removal_count(at: Inserter, position: fx.Node, r: int, protect: int) -> fx.Node:
    """How many tokens the step removes, [B, 1] (the same in every row): ``clamped_r(N, r, protect)``
    of bevel::merge_tokens (at most half of the unprotected tokens, and at least two tokens left),
    computed from the tensors at run time (N may be symbolic)."""
    free = at(aten.sum.dim_IntList, at(aten.ge.Scalar, position, protect), [1], True)
    tokens = at(aten.sum.dim_IntList, at(aten.ge.Scalar, position, 0), [1], True)
    count = at(aten.clamp_max.default, at(aten.div.Scalar_mode, free, 2, rounding_mode="floor"), r)
    return at(aten.minimum.default, count, at(aten.clamp_min.default, at(aten.sub.Tensor, tokens, 2), 0))


def descending_rank(at: Inserter, score: fx.Node, position: fx.Node) -> fx.Node:
    """Each token's place [B, N] in its row sorted by ``score``, highest first (ties: the earlier),
    counted by comparing every pair of tokens: deterministic, and plain comparisons in ONNX (which
    has no stable sort)."""
    other, own = at(aten.unsqueeze.default, score, 1), at(aten.unsqueeze.default, score, 2)  # [B, i, j]
    earlier = at(aten.lt.Tensor, at(aten.unsqueeze.default, position, 1), at(aten.unsqueeze.default, position, 2))
    tie_before = at(aten.logical_and.default, at(aten.eq.Tensor, other, own), earlier)
    before = at(aten.logical_or.default, at(aten.gt.Tensor, other, own), tie_before)
    return at(aten.sum.dim_IntList, before, [2])


def kept_slots(at: Inserter, kept: fx.Node) -> fx.Node:
    """The slot [B, N] of the last kept token at or before each token (the first slot before any)."""
    prefix = at(aten.sub.Tensor, at(aten.cumsum.default, kept, 1, dtype=torch.int64), 1)
    return at(aten.clamp_min.default, prefix, 0)


def removal_scores(at: Inserter, score: fx.Node, size: fx.Node, position: fx.Node, protect: int) -> fx.Node:
    """``score`` with padding above it (later padding first, as bipartite_match) and the protected
    tokens at -inf, so that padding goes first and protected tokens never."""
    padding = at(aten.add.Tensor, at(aten._to_copy.default, position, dtype=torch.float32), PADDING_SCORE)
    score = at(aten.where.self, at(aten.gt.Scalar, size, 0), score, padding)
    return at(aten.where.ScalarOther, at(aten.ge.Scalar, position, protect), score, -math.inf)


def attention_received(at: Inserter, block: AttentionBlock, size: fx.Node, importance: str) -> fx.Node:
    """The attention [B, N] each token receives in ``block``, averaged over heads: from the first
    query (``cls``) or the mean over the real queries (``mean``)."""
    query, keys = block.attention.args[0], block.keys
    scale = argument(block.attention, "scale", None)
    if scale is None:
        scale = 1.0 / math.sqrt(at.graph.shape(query)[-1])
    if importance == "cls":
        query = at(aten.slice.Tensor, query, 2, 0, 1)
    logits = at(aten.matmul.default, query, at(aten.transpose.int, keys, -2, -1))  # [B, H, Q, N]
    mask = at(aten.log.default, size)  # 0 on real tokens, -inf on padding (sizes stay 0 or 1 when pruning)
    mask = at(aten.unsqueeze.default, at(aten.unsqueeze.default, mask, 1), 1)
    logits = at(aten.add.Tensor, at(aten.mul.Tensor, at(aten._to_copy.default, logits, dtype=torch.float32), scale),
                mask)
    attention = at(aten.mean.dim, at(aten._softmax.default, logits, -1, False), [1])  # [B, Q, N]
    if importance == "cls":
        return at(aten.squeeze.dim, attention, 1)
    real = at(aten.clamp_max.default, size, 1.0)
    summed = at(aten.squeeze.dim, at(aten.bmm.default, at(aten.unsqueeze.default, real, 1), attention), 1)
    return at(aten.div.Tensor, summed, at(aten.clamp_min.default, at(aten.sum.dim_IntList, real, [1], True), 1.0))


def prune_planner(protect: int, importance: str):
    """The plan of token pruning: drop the least attended tokens (padding first, protected never)."""
    def plan(at: Inserter, block: AttentionBlock, metric, size, r: int):
        position = positions(at, size)
        received = attention_received(at, block, size, importance)
        score = removal_scores(at, at(aten.neg.default, received), size, position, protect)
        rank = descending_rank(at, score, position)
        kept = at(aten.ge.Tensor, rank, removal_count(at, position, r, protect))
        weight = at(aten.mul.Tensor, size, kept)
        return kept_slots(at, kept), weight
    return plan


@register_pass("token_prune")
class TokenPruning(Pass):
    """Drop the least attended tokens after the attention of each transformer block (training-free)."""

    @dataclass
    class Params(TokenReductionParams):
        importance: str = param("cls", "attention received from the first (CLS) query, or from every real query",
                                choices=("cls", "mean"))

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        p = self.params
        return run_planned(self.name, graph, p, prune_planner(p.protect, p.importance), False, "hidden")
