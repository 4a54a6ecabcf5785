"""``prune.magnitude``: global unstructured magnitude pruning with a per-layer floor.

One threshold on |w| across every Linear and Conv weight, so layers with many small weights lose
more; each layer keeps at least ``min_keep`` of its weights so none is emptied. This is global
magnitude pruning with a minimum threshold from Gupta et al., "Is Complexity Required for Neural
Network Pruning? A Case Study on Global Magnitude Pruning". Pruned weights are stored as zeros.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import torch

from bevel.ir.analysis import layer_weights, weights_read_outside_layers
from bevel.ir.graph import Graph
from bevel.passes.base import Pass, PassContext, PassParams, PassResult, param
from bevel.passes.registry import register_pass


@register_pass("prune.magnitude")
class GlobalMagnitudePrune(Pass):
    """Zero the smallest-magnitude weights across all Linear and Conv layers at once (matmuls by a
    weight matrix, such as GPT-2's Conv1D, count as Linear layers)."""

    @dataclass
    class Params(PassParams):
        sparsity: float = param(0.5, "fraction of all Linear/Conv weights set to zero", ge=0.0, lt=1.0)
        min_keep: float = param(0.01, "fraction of each layer's weights always kept (the per-layer floor)",
                                gt=0.0, le=1.0)
        skip: tuple[str, ...] = param((), "weight-name patterns (fnmatch, e.g. 'pooler.*') left dense")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        weights = {name: w for name, w in layer_weights(graph).items()
                   if not any(fnmatch.fnmatchcase(name, pattern) for pattern in self.params.skip)}
        notes = []
        for name in sorted(weights_read_outside_layers(graph) & weights.keys()):
            del weights[name]  # e.g. an output layer tied to the embedding table: pruning it would prune both
            notes.append(f"{name} left dense: it is also read outside Linear/Conv layers (a tied weight)")
        if not weights:
            return PassResult(changed=False, notes=notes + ["no Linear or Conv weights to prune"])
        keep_counts = global_magnitude_keep_counts(weights, self.params.sparsity, self.params.min_keep)
        per_layer = {}
        for name, weight in weights.items():
            pruned = prune_smallest(weight, weight.numel() - keep_counts[name])
            graph.set_param(name, pruned)
            per_layer[name] = round(1 - keep_counts[name] / weight.numel(), 4)
        total = sum(w.numel() for w in weights.values())
        achieved = 1 - sum(keep_counts.values()) / total
        if achieved < self.params.sparsity - 0.005:
            notes.append(f"reached sparsity {achieved:.3f} < {self.params.sparsity}: "
                         f"min_keep={self.params.min_keep} holds weights in every layer")
        graph.refresh()
        stats = {"sparsity": round(achieved, 4), "layers": len(weights), "per_layer_sparsity": per_layer}
        return PassResult(changed=True, stats=stats, notes=notes)


def global_magnitude_keep_counts(weights: dict[str, torch.Tensor], sparsity: float,
                                 min_keep: float) -> dict[str, int]:
    """How many weights each layer keeps under one global magnitude threshold with a per-layer floor.

    Finds the smallest threshold t such that pruning every weight with |w| <= t, but never more than
    a layer's cap (its size minus the floor), removes at least ``sparsity`` of all weights.
    """
    sorted_mags = {name: w.detach().abs().flatten().float().sort().values for name, w in weights.items()}
    caps = {name: w.numel() - max(1, math.ceil(min_keep * w.numel())) for name, w in weights.items()}
    target = round(sparsity * sum(w.numel() for w in weights.values()))

    def pruned_at(threshold: torch.Tensor) -> dict[str, int]:
        return {name: min(int(torch.searchsorted(mags, threshold, right=True)), caps[name])
                for name, mags in sorted_mags.items()}

    if target == 0:
        return {name: w.numel() for name, w in weights.items()}
    # Bisect over the bit patterns of non-negative float32 values, which sort like the values:
    # at most 32 steps, and the threshold found is exactly one of the magnitudes.
    low = 0
    high = int(max(m[-1] for m in sorted_mags.values()).view(torch.int32))
    while low < high:
        mid = (low + high) // 2
        if sum(pruned_at(torch.tensor(mid, dtype=torch.int32).view(torch.float32)).values()) >= target:
            high = mid
        else:
            low = mid + 1
    counts = pruned_at(torch.tensor(low, dtype=torch.int32).view(torch.float32))
    return {name: weights[name].numel() - counts[name] for name in weights}


def prune_smallest(weight: torch.Tensor, count: int) -> torch.Tensor:
    """A copy of ``weight`` with its ``count`` smallest-magnitude entries set to zero.

    Uses the count-th smallest magnitude as a threshold (linear time, no sort); among entries equal
    to the threshold, the first ones in memory order go.
    """
    pruned = weight.detach().clone()
    if count <= 0:
        return pruned
    flat, magnitude = pruned.view(-1), pruned.detach().abs().flatten()
    threshold = magnitude.kthvalue(count).values
    below = magnitude < threshold
    ties = (magnitude == threshold).nonzero().flatten()[: count - int(below.sum())]
    flat[below] = 0
    flat[ties] = 0
    return pruned
