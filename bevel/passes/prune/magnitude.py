"""``prune.magnitude``: global unstructured magnitude pruning with a per-layer floor.

One threshold on |w| across every Linear and Conv weight, so layers with many small weights lose
more; each layer keeps at least ``min_keep`` of its weights so none is emptied. This is global
magnitude pruning with a minimum threshold from Gupta et al., "Is Complexity Required for Neural
Network Pruning? A Case Study on Global Magnitude Pruning". Pruned weights are stored as zeros.

``importance="activation"`` is Wanda (Sun et al., "A Simple and Effective Pruning Approach for Large
Language Models"): a weight's score is ``|W_ij| * ||X_j||_2``, its magnitude times the norm of its
input channel over the calibration batches, and, as in the paper, scores are compared within each
output row of a Linear layer, every row losing the same fraction. The paper found this per-output
comparison better than a per-layer or global one: the input-norm factor makes scores of different
rows and layers incomparable, while within a row it says which inputs the output relies on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bevel.errors import PassError
from bevel.ir.analysis import layer_weights, weights_read_outside_layers
from bevel.ir.graph import Graph
from bevel.passes.base import Pass, PassContext, PassParams, PassResult, param
from bevel.passes.quantize.calibration import collect_input_stats
from bevel.passes.quantize.sites import LinearSite, find_sites
from bevel.passes.registry import register_pass
from bevel.passes.skip_patterns import skipped, unmatched_skip_notes

aten = torch.ops.aten



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
        importance: str = param("magnitude", "'magnitude': one global threshold on |w|; 'activation': Wanda, "
                                             "|w| times its input channel's calibration norm, each output "
                                             "row of a Linear pruned alike (needs calibration)",
                                choices=("magnitude", "activation"))

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.params.importance == "activation"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if self.params.importance == "activation":
            return self._run_wanda(graph, ctx)
        weights = {name: w for name, w in layer_weights(graph).items()
                   if not skipped(name, self.params.skip)}
        notes = unmatched_skip_notes(self.params.skip, graph)
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


    def _run_wanda(self, graph: Graph, ctx: PassContext) -> PassResult:
        require_calibration(self.name, ctx)
        sites, notes = find_sites(graph, self.params.skip, embeddings=False, left="left dense")
        linear_names = {site.weight_name for site in sites}
        for name in sorted(layer_weights(graph).keys() - linear_names - weights_read_outside_layers(graph)):
            if not skipped(name, self.params.skip):
                notes.append(f"{name} left dense: activation importance scores the input channels of "
                             f"Linear layers, and this weight is not one")
        if not sites:
            return PassResult(changed=False, notes=notes + ["no Linear layers to prune"])
        norms = input_channel_norms(graph, sites, ctx.calibration)
        per_layer, kept, total = {}, 0, 0
        for site in sites:
            width = site.weight.shape[1]
            keep = max(width - round(self.params.sparsity * width), math.ceil(self.params.min_keep * width))
            scores = site.weight.abs().float() * norms[site.weight_name]
            pruned = keep_largest_per_row(site.weight, scores, keep)
            set_linear_weight(graph, site, pruned)
            per_layer[site.weight_name] = round(1 - keep / width, 4)
            kept += keep * site.weight.shape[0]
            total += site.weight.numel()
        achieved = 1 - kept / total
        if achieved < self.params.sparsity - 0.005:
            notes.append(f"reached sparsity {achieved:.3f} < {self.params.sparsity}: "
                         f"min_keep={self.params.min_keep} holds weights in every row")
        graph.refresh()
        stats = {"sparsity": round(achieved, 4), "layers": len(sites), "per_layer_sparsity": per_layer,
                 "importance": "activation"}
        return PassResult(changed=True, stats=stats, notes=notes)


def require_calibration(pass_name: str, ctx: PassContext) -> None:
    """Refuse to score by activations without the user's calibration batches."""
    if not ctx.calibrated:
        raise PassError(f"pass '{pass_name}' with importance='activation' needs calibration data: pass "
                        f"calibration=[batch, ...] (the norms of each layer's input channels are measured on it)")


def input_channel_norms(graph: Graph, sites: list[LinearSite], batches: list[tuple]) -> dict[str, torch.Tensor]:
    """``||X_j||_2`` of every input channel j of each layer over ``batches``, by weight name (one
    calibration run)."""
    stats = collect_input_stats(graph, {s.node: s.x for s in sites}, batches)
    return {s.weight_name: stats[s.node].squares.sqrt() for s in sites}


def keep_largest_per_row(weight: torch.Tensor, scores: torch.Tensor, keep: int) -> torch.Tensor:
    """A copy of ``weight`` [N, K] keeping, in each row, the ``keep`` entries with the highest scores."""
    kept = scores.topk(keep, dim=1).indices
    mask = torch.zeros_like(weight, dtype=torch.bool).scatter_(1, kept, True)
    return torch.where(mask, weight.detach(), torch.zeros((), dtype=weight.dtype))


def set_linear_weight(graph: Graph, site: LinearSite, weight: torch.Tensor) -> None:
    """Store ``weight`` [N, K] for ``site``, in the layout its op reads (addmm reads it [K, N])."""
    stored = weight.t() if site.node.target == aten.addmm.default else weight
    graph.set_param(site.weight_name, stored.contiguous())


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
