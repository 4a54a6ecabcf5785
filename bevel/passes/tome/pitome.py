"""``tome.pitome``: spectrum-preserving token merging (PiToMe, Tran et al. 2024, "Accelerating
Transformers with Spectrum-Preserving Token Merging") as a graph rewrite of any captured encoder.

Each token gets an energy score from the cosines of its metric (the attention keys averaged over
heads) with every real token: ``E_i = mean_j f(cos(x_i, x_j))``, ``f(x) = x`` from ``margin`` up,
``alpha * (exp(x - margin) - 1)`` below. High energy marks a token in a large cluster of similar
ones; the ``2r`` highest are the merge candidates, split alternately (by energy order) into A and B,
and each A token merges into its most similar B token; low-energy (isolated) tokens are kept. As in
``tome``, padding is removed before any real token (taking part of the count; the A tokens with the
best matches merge for the rest) and never absorbs one, protected tokens stay, and ``r`` is clamped
to half of the unprotected tokens at run time. The plan is made of plain aten ops in the graph.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch

from bevel.ir.graph import Graph
from bevel.passes.base import Pass, PassContext, PassResult, param
from bevel.passes.registry import register_pass
from bevel.passes.tome.blocks import AttentionBlock
from bevel.passes.tome.merge import TokenReductionParams, run_planned
from bevel.passes.tome.rewrite import Inserter
from bevel.passes.tome.token_prune import descending_rank, positions, removal_count, removal_scores

aten = torch.ops.aten


def pitome_planner(protect: int, margin: float, alpha: float):
    """The plan of PiToMe (see the module docstring): ``dest`` [B, N]."""
    def plan(at: Inserter, block: AttentionBlock, metric, size, r: int):
        position = positions(at, size)
        real = at(aten.gt.Scalar, size, 0)
        free = at(aten.ge.Scalar, position, protect)
        x = at(aten._to_copy.default, metric, dtype=torch.float32)
        norm = at(aten.clamp_min.default, at(aten.linalg_vector_norm.default, x, 2, [-1], True), 1e-12)
        unit = at(aten.div.Tensor, x, norm)
        similarity = at(aten.bmm.default, unit, at(aten.transpose.int, unit, 1, 2))  # [B, N, N]
        below = at(aten.mul.Tensor, at(aten.expm1.default, at(aten.sub.Tensor, similarity, margin)), alpha)
        energy = at(aten.where.self, at(aten.ge.Scalar, similarity, margin), similarity, below)
        # the sum over real tokens: the mean up to a factor per row, which does not change the order
        weights = at(aten.unsqueeze.default, at(aten.clamp_max.default, size, 1.0), -1)
        energy = at(aten.squeeze.dim, at(aten.bmm.default, energy, weights), -1)
        candidate = at(aten.logical_and.default, real, free)
        rank = descending_rank(at, at(aten.where.ScalarOther, candidate, energy, -math.inf), position)
        count = removal_count(at, position, r, protect)
        candidate = at(aten.logical_and.default, candidate, at(aten.lt.Tensor, rank, at(aten.mul.Tensor, count, 2)))
        odd = at(aten.eq.Scalar, at(aten.remainder.Scalar, rank, 2), 1)
        side_a = at(aten.logical_and.default, candidate, at(aten.logical_not.default, odd))
        side_b = at(aten.logical_and.default, candidate, odd)
        to_b = at(aten.where.ScalarOther, at(aten.unsqueeze.default, side_b, 1), similarity, -math.inf)
        best = at(aten.max.dim, to_b, -1)
        best, best_position = at(operator.getitem, best, 0), at(operator.getitem, best, 1)
        score = removal_scores(at, at(aten.where.ScalarOther, side_a, best, -math.inf), size, position, protect)
        kept = at(aten.ge.Tensor, descending_rank(at, score, position), count)
        prefix = at(aten.sub.Tensor, at(aten.cumsum.default, kept, 1, dtype=torch.int64), 1)
        stays = at(aten.logical_or.default, kept, at(aten.logical_not.default, real))
        return at(aten.where.self, stays, at(aten.clamp_min.default, prefix, 0),
                  at(aten.gather.default, prefix, 1, best_position))
    return plan


@register_pass("tome.pitome")
class PiToMe(Pass):
    """Merge the tokens of the largest clusters of similar tokens in each transformer block (PiToMe)."""

    @dataclass
    class Params(TokenReductionParams):
        margin: float = param(0.5, "cosine from which a similar token adds its full cosine to the energy",
                              ge=-1.0, le=1.0)
        alpha: float = param(1.0, "weight of the (negative) energy of tokens less similar than the margin", ge=0.0)
        prop_attn: bool = param(True, "proportional attention: a merged token weighs as the tokens it stands for")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        p = self.params
        return run_planned(self.name, graph, p, pitome_planner(p.protect, p.margin, p.alpha), p.prop_attn,
                           "keys")
