"""Statistics of each Linear's input on the calibration batches, gathered in one run of the graph.

Per layer: the largest |x| and the sum of x^2 per input channel (SmoothQuant's migration strength;
Wanda's input norms), optionally the
Hessian ``X^T X`` of the layer's least-squares problem (GPTQ), and a sample of input rows on which
a quantized layer's output error is measured.

``quantization_stages`` orders the layers for passes that quantize sequentially: a layer's
statistics are then gathered after every layer it depends on was quantized, so it is fitted to
the inputs it will really see (as GPTQ's reference implementation does block by block).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from bevel.ir.graph import Graph

# rows kept per layer to measure its output error: enough for a stable relative error, small in memory
SAMPLE_ROWS = 512


@dataclass
class InputStats:
    """What one layer saw: per-channel max |x| and sum of x^2, the summed ``X^T X`` and sample rows."""

    absmax: torch.Tensor | None = None
    squares: torch.Tensor | None = None
    hessian: torch.Tensor | None = None
    rows: int = 0
    samples: list[torch.Tensor] = field(default_factory=list)

    def add(self, x: torch.Tensor, with_hessian: bool, sample_rows: int) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        peak = flat.abs().amax(dim=0)
        self.absmax = peak if self.absmax is None else torch.maximum(self.absmax, peak)
        squares = (flat * flat).sum(dim=0)
        self.squares = squares if self.squares is None else self.squares + squares
        if with_hessian:
            product = flat.T @ flat  # float32 sums of a few thousand rows lose nothing GPTQ notices
            self.hessian = product if self.hessian is None else self.hessian + product
        self.rows += flat.shape[0]
        step = max(1, flat.shape[0] // max(1, sample_rows))
        self.samples.append(flat[::step][:sample_rows].clone())

    def sample(self) -> torch.Tensor:
        """The kept input rows, [rows, K]."""
        return torch.cat(self.samples)


class _SeenAll(Exception):
    """Raised once every watched layer has been seen: the rest of the graph need not run."""


class _Recorder(fx.Interpreter):
    def __init__(self, module: fx.GraphModule, watched: dict[fx.Node, fx.Node], stats: dict[fx.Node, InputStats],
                 with_hessian: bool, sample_rows: int) -> None:
        super().__init__(module)
        self.watched, self.stats = watched, stats
        self.with_hessian, self.sample_rows = with_hessian, sample_rows
        order = {node: i for i, node in enumerate(module.graph.nodes)}
        self.last = max(watched, key=order.__getitem__) if watched else None

    def run_node(self, n: fx.Node) -> Any:
        if n in self.watched:
            self.stats[n].add(self.env[self.watched[n]], self.with_hessian, self.sample_rows)
            if n is self.last:
                raise _SeenAll
        return super().run_node(n)


def collect_input_stats(graph: Graph, inputs: dict[fx.Node, fx.Node], batches: list[tuple[Any, ...]],
                        with_hessian: bool = False) -> dict[fx.Node, InputStats]:
    """Run ``graph`` on ``batches`` and record, for each layer node, the statistics of its input node."""
    stats = {node: InputStats() for node in inputs}
    per_batch = max(1, SAMPLE_ROWS // max(1, len(batches)))
    recorder = _Recorder(graph.module, inputs, stats, with_hessian, per_batch)
    with torch.no_grad():
        for batch in batches:
            try:
                recorder.run(*batch)
            except _SeenAll:
                pass
    return stats


def quantization_stages(sites: list[Any]) -> list[list[Any]]:
    """``sites`` (in graph order) cut into stages whose layers do not feed each other: a stage ends
    before the first layer that reads, directly or not, the output of a layer already in it."""
    stages: list[list[Any]] = []
    current: list[Any] = []
    members: set[fx.Node] = set()
    for site in sites:
        if members and _reads_any(site.node, members):
            stages.append(current)
            current, members = [], set()
        current.append(site)
        members.add(site.node)
    if current:
        stages.append(current)
    return stages


def _reads_any(node: fx.Node, sources: set[fx.Node]) -> bool:
    """Whether ``node`` depends on any of ``sources``."""
    seen: set[fx.Node] = set()
    pending = list(node.all_input_nodes)
    while pending:
        current = pending.pop()
        if current in sources:
            return True
        if current not in seen:
            seen.add(current)
            pending.extend(current.all_input_nodes)
    return False
