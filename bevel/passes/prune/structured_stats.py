"""Per-channel statistics of the tensors that structured pruning cuts, gathered in one run of the graph
over the calibration batches: the sum of squares (Wanda's activation norm, the diagonal of the
layer's ``X^T X``), the mean, and the mean over the batch of every position (what a layer's bias
absorbs for removed channels: a conv's zero padding makes their contribution depend on position),
and for channels in the last dimension (a Linear's input) the sum of ``x x^T``. In batches of padded
sequences only the real tokens count (see :func:`bevel.passes.token_rows.token_mask`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from bevel.ir.analysis import descendants
from bevel.ir.graph import Graph
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


class _SeenAll(Exception):
    """Raised once every watched tensor has been seen: the rest of the graph need not run."""


class _Recorder(fx.Interpreter):
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
                self.stats[n] = ChannelStats(squares, total, flat.shape[0], value.sum(dim=0), value.shape[0], gram)
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
            if n is self.last:
                raise _SeenAll
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
            try:
                recorder.run(*batch)
            except _SeenAll:
                pass
    return recorder.stats


def recalibrate_batch_norms(graph: Graph, changed: list[fx.Node], batches: list[tuple[Any, ...]],
                            batch_norms: set[Any]) -> list[str]:
    """Re-estimate the running mean and variance of every BatchNorm downstream of ``changed`` on ``batches``.

    Removing channels shifts the statistics of every later layer's output, and a BatchNorm in eval
    mode would keep normalizing with the old ones; its learned scale and shift stay as they are. The
    BatchNorms are taken in graph order, each measured after the earlier ones were updated, since
    each one's input depends on them. Returns the names of the running means updated.
    """
    after = set(changed) | descendants(*changed)
    updated = []
    for node in graph.fx_graph.nodes:
        if node.op != "call_function" or node.target not in batch_norms or node.args[0] not in after:
            continue
        mean_attr, var_attr = node.args[3], node.args[4]
        if not (graph.is_tensor_attr(mean_attr) and graph.is_tensor_attr(var_attr)):
            continue  # running statistics that are not stored tensors: nothing to update
        seen = collect_channel_stats(graph, {node.args[0]: 1}, batches)[node.args[0]]
        mean = seen.total.double() / seen.count
        variance = (seen.squares.double() / seen.count - mean.pow(2)).clamp(min=0)
        dtype = graph.param(mean_attr.target).dtype
        graph.set_param(mean_attr.target, mean.to(dtype))
        graph.set_param(var_attr.target, variance.to(dtype))
        updated.append(mean_attr.target)
    return updated
