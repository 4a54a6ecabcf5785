"""Per-channel statistics of the tensors that structured pruning cuts, gathered in one run of the graph
over the calibration batches: the sum of squares (Wanda's activation norm, the diagonal of the
layer's ``X^T X``), the mean, and the mean over the batch of every position (what a layer's bias
absorbs for removed channels: a conv's zero padding makes their contribution depend on position),
and for channels in the last dimension (a Linear's input) the sum of ``x x^T``, for channels in
dimension 1 (an image's) each example's sum. In batches of padded sequences only the real tokens count
(see :func:`bevel.passes.token_rows.token_mask`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from bevel.errors import BevelError
from bevel.ir.analysis import descendants
from bevel.ir.graph import Graph
from bevel.ir.partial_run import PartialInterpreter, SeenAll
from bevel.passes.token_rows import token_mask


@dataclass
class ChannelStats:
    """Sums over every position of a tensor but its channel dimension."""

    squares: torch.Tensor
    total: torch.Tensor
    count: int
    batch_total: torch.Tensor | None = None  # summed over the batch dim only; None if sizes varied
    batch_count: int = 0
    gram: torch.Tensor | None = None  # sum of x x^T over positions, for tensors whose channels are the last dim
    # for tensors whose channels are dim 1 (images), each example's sum over its positions and its number of
    # positions (float64): the examples are the independent samples, and their spread says how far a
    # statistic is determined (see :func:`shrink`)
    example_totals: list[torch.Tensor] | None = None
    example_counts: list[torch.Tensor] | None = None

    @property
    def norm(self) -> torch.Tensor:
        """The L2 norm of each channel over the calibration data."""
        return self.squares.sqrt()

    @property
    def mean(self) -> torch.Tensor:
        """The mean of each channel over the calibration data."""
        return self.total / max(1, self.count)

    @property
    def batch_mean(self) -> torch.Tensor | None:
        """The mean input of one example, position by position; None if the batches' sizes differed."""
        return None if self.batch_total is None else self.batch_total / max(1, self.batch_count)

    def per_example(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each example's sum over its positions [examples, channels] and number of positions
        [examples, 1], in float64."""
        return torch.cat(self.example_totals), torch.cat(self.example_counts)


class _Recorder(PartialInterpreter):
    def __init__(self, graph: Graph, watched: dict[fx.Node, int]) -> None:
        super().__init__(graph.module)
        self.watched = watched
        self.stats: dict[fx.Node, ChannelStats] = {}
        order = {node: i for i, node in enumerate(graph.fx_graph.nodes)}
        self.last = max(watched, key=order.__getitem__)
        self.token_mask: torch.Tensor | None = None

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n in self.watched:
            value = result.detach().float()
            x = value.movedim(self.watched[n], -1)
            mask = self.token_mask
            if mask is not None and tuple(value.shape[:mask.dim()]) == tuple(mask.shape) \
                    and self.watched[n] % value.dim() >= mask.dim():
                x = x[mask]  # the real tokens only: padding is not what the layer sees in use
            flat = x.reshape(-1, x.shape[-1])
            seen = self.stats.get(n)
            squares, total = (flat * flat).sum(dim=0), flat.sum(dim=0)
            gram = flat.T @ flat if self.watched[n] in (-1, value.dim() - 1) else None
            if seen is None:
                seen = self.stats[n] = ChannelStats(squares, total, flat.shape[0], value.sum(dim=0), value.shape[0],
                                                    gram)
                if self.watched[n] % value.dim() == 1:
                    seen.example_totals, seen.example_counts = [], []
            else:
                if gram is not None:
                    seen.gram += gram
                seen.squares += squares
                seen.total += total
                seen.count += flat.shape[0]
                if seen.batch_total is not None and seen.batch_total.shape == value.shape[1:]:
                    seen.batch_total += value.sum(dim=0)
                    seen.batch_count += value.shape[0]
                else:
                    seen.batch_total = None
            if seen.example_totals is not None:
                rows = value.movedim(1, -1).reshape(value.shape[0], -1, value.shape[1])
                seen.example_totals.append(rows.sum(dim=1).double())
                seen.example_counts.append(torch.full((value.shape[0], 1), rows.shape[1], dtype=torch.float64))
            if n is self.last:
                raise SeenAll
        return result


def collect_channel_stats(graph: Graph, watched: dict[fx.Node, int],
                          batches: list[tuple[Any, ...]]) -> dict[fx.Node, ChannelStats]:
    """Run ``graph`` on ``batches``; for each watched node, the statistics of its value along the given dim."""
    if not watched:
        return {}
    recorder = _Recorder(graph, watched)
    with torch.no_grad():
        for batch in batches:
            recorder.token_mask = token_mask(batch)
            recorder.run_until_seen(*batch)
    if any(seen.count == 0 for seen in recorder.stats.values()):  # nothing to measure or fit on
        raise BevelError("the calibration batches hold no real token (their attention masks are all zero, or "
                         "the batches are empty), so no channel statistics can be measured; give batches with "
                         "real tokens")
    return recorder.stats


def _batch_norms_after(graph: Graph, changed: list[fx.Node], batch_norms: set[Any]) -> list[fx.Node]:
    """The BatchNorms with stored running statistics downstream of ``changed``, in graph order."""
    after = set(changed) | descendants(*changed)
    return [node for node in graph.fx_graph.nodes
            if node.op == "call_function" and node.target in batch_norms and node.args[0] in after
            and graph.is_tensor_attr(node.args[3]) and graph.is_tensor_attr(node.args[4])]


def shrink(estimate: torch.Tensor, left_out: torch.Tensor) -> torch.Tensor:
    """A correction ``estimate`` [C] (one per channel) measured on the calibration examples, kept only
    as far as they determine it.

    ``left_out`` [N, C] holds the estimate measured without each of the N examples in turn; their
    spread is the jackknife variance of the estimate. Its mean over the channels is kept as far as
    its own noise allows (``c = max(0, 1 - variance / mean^2)``: applying ``c`` times an estimate of
    ``t`` errs least at ``c = t^2 / (t^2 + variance)``, ``t^2`` estimated as ``mean^2 - variance``),
    and each channel's deviation from it by the James-Stein factor ``max(0, 1 - (C - 3) v / |dev|^2)``
    with ``v`` the mean variance of the channels (Efron and Morris 1973): the noise is measured over all
    channels, not trusted from one. A few samples per channel (a small feature map seen in a handful of
    images) make each channel's figure mostly noise, and applied whole it would make the layer worse
    than leaving it alone; a change the channels share, or that the examples agree on, stays. With
    three channels or fewer each is shrunk on its own; fewer than two examples determine nothing.
    """
    n, size = left_out.shape
    if n < 2:
        return torch.zeros_like(estimate)

    def variance(values: torch.Tensor) -> torch.Tensor:
        return (n - 1) / n * (values - values.mean(dim=0)).pow(2).sum(dim=0)

    if size <= 3:  # too few channels to measure the noise over: each one on its own
        return estimate * (1 - variance(left_out) / estimate.pow(2)).nan_to_num(0).clamp(min=0)
    center = estimate.mean()
    center = center * (1 - variance(left_out.mean(dim=1)) / center.pow(2)).nan_to_num(0).clamp(min=0)
    deviation = estimate - estimate.mean()
    keep = (1 - (size - 3) * variance(left_out).mean() / deviation.pow(2).sum()).nan_to_num(0).clamp(min=0)
    return center + keep * deviation


def batch_norm_inputs(graph: Graph, changed: list[fx.Node], batches: list[tuple[Any, ...]],
                      batch_norms: set[Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The per-example channel sums (:meth:`ChannelStats.per_example`) over ``batches`` of the input of
    every BatchNorm downstream of ``changed``, by the name of its running mean: taken before a rewrite,
    what :func:`recalibrate_batch_norms` compares with after it."""
    nodes = _batch_norms_after(graph, changed, batch_norms)
    seen = collect_channel_stats(graph, {node.args[0]: 1 for node in nodes}, batches)
    return {node.args[3].target: seen[node.args[0]].per_example() for node in nodes}


def recalibrate_batch_norms(graph: Graph, changed: list[fx.Node], batches: list[tuple[Any, ...]],
                            batch_norms: set[Any], before: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[str]:
    """Move the running mean of every BatchNorm downstream of ``changed`` by as much as the rewrite
    moved the mean of its input over ``batches``, as far as they determine that shift.

    Removing channels shifts the input of every later BatchNorm, and in eval mode it would keep
    subtracting the old mean. ``before`` holds the input's per-example sums over the same examples in
    the original graph (:func:`batch_norm_inputs`, cut to the channels kept); the shift is their
    difference, so that the BatchNorm's output keeps the mean it had, :func:`shrink`-ed to what the
    examples agree on. Only the change is measured: setting the mean to that of a few batches would
    replace what training measured on far more data, and with calibration data unlike the training
    data (or BatchNorms never trained) it would change what the network computes.

    The variance is left as it is. Re-estimating it divides each channel by a deviation measured on
    the calibration batches; where they give a channel few samples (4 at a 1x1 feature map for 2
    batches of 2 images) that estimate is often far too small, and the errors multiply from layer to
    layer: EfficientNet-B0's outputs grew a million-fold. Matching only its change, over the same
    examples and shrunk, still grew them tenfold on other images, since the BatchNorms, fitted one
    after the other, fit those examples. And where the removed channels were independent of the
    kept ones, the least-squares map from the pruned input to the old output keeps the scale anyway.
    The BatchNorms are taken in graph order, each measured after the earlier ones were updated, since
    each one's input depends on them. Returns the names of the running means updated.
    """
    updated = []
    for node in _batch_norms_after(graph, changed, batch_norms):
        mean_attr = node.args[3]
        if mean_attr.target not in before:
            continue  # a BatchNorm the rewrite made (none today): nothing to compare with
        (old, count), (now, _) = before[mean_attr.target], \
            collect_channel_stats(graph, {node.args[0]: 1}, batches)[node.args[0]].per_example()
        eps = node.args[7] if node.target == torch.ops.aten.batch_norm.default else node.args[6]
        running_mean, running_var = graph.param(mean_attr.target), graph.param(node.args[4].target)
        deviation = (running_var.double() + eps).sqrt()  # in the BatchNorm's output units the channels compare
        # the shift over all examples, and over all but each one (the sums less that example's)
        moved = now - old
        shift = moved.sum(dim=0) / count.sum() / deviation
        left_out = (moved.sum(dim=0) - moved) / (count.sum() - count) / deviation
        new_mean = running_mean.double() + shrink(shift, left_out) * deviation
        graph.set_param(mean_attr.target, new_mean.to(running_mean.dtype))
        updated.append(mean_attr.target)
    return updated
