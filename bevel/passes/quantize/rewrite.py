"""The loop every quantize pass shares: find the layers, gather calibration statistics, quantize each
layer, measure its output error, and swap it for a bevel op unless the error is over ``max_layer_error``.

A pass only says how one layer is quantized (:meth:`QuantizePass.quantize_linear`); layers whose
measured error is too high stay in float and the report lists them with their errors, so the
precision of each layer is decided by measurement. At the end, quantized layers that read the same
input are fused into one op (``fuse``, see ``siblings``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from bevel.ir.analysis import CONV_OPS, layer_weight
from bevel.ir.graph import Graph
from bevel.passes.base import Pass, PassContext, PassParams, PassResult, param
from bevel.passes.linear_from_products import products_of_weights_note
from bevel.passes.quantize.calibration import (InputStats, Resume, collect_input_stats, few_rows_note,
                                               quantization_stages)
from bevel.passes.quantize.siblings import fuse_siblings
from bevel.passes.quantize.sites import EmbeddingSite, LinearSite, find_sites
from bevel.passes.rewritten_layers import rewritten_layers_note
from bevel.runtime.ops.quant_format import dequantize_int8_per_channel, quantize_int8_per_channel


@dataclass
class Stored:
    """A tensor the rewrite stores beside the layer's weight, under ``<weight>_<suffix>``."""

    suffix: str
    tensor: torch.Tensor


# placeholders in an op's argument list: the layer's input and its bias
INPUT = object()
BIAS = object()


@dataclass
class Quantized:
    """How one layer is rewritten: ``op(*args)`` with ``Stored``, ``INPUT`` and ``BIAS`` in ``args``;
    with ``input_scale`` the input is first multiplied by it (an ``aten.mul`` in the graph)."""

    op: Any
    args: tuple[Any, ...]
    input_scale: Stored | None = None

    def evaluate(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The rewritten layer's output on ``x``."""
        if self.input_scale is not None:
            x = x * self.input_scale.tensor
        values = [x if a is INPUT else bias if a is BIAS else a.tensor if isinstance(a, Stored) else a
                  for a in self.args]
        return self.op(*values)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``||approx - exact|| / ||exact||`` (Frobenius), 0 for an all-zero ``exact`` matched exactly."""
    norm = float(exact.float().norm())
    diff = float((approx.float() - exact.float()).norm())
    return diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))


def int8_embedding_table(site: EmbeddingSite) -> tuple[Quantized, float]:
    """An embedding table stored as int8 rows, and the table's relative error."""
    qweight, scale = quantize_int8_per_channel(site.weight)
    error = relative_error(dequantize_int8_per_channel(qweight, scale), site.weight)
    return Quantized(torch.ops.bevel.int8_embedding.default, (Stored("qweight", qweight), Stored("scale", scale),
                                                              INPUT)), error


def _convolutions_note(graph: Graph) -> list[str]:
    """Says how many convolutions stay in float: the quantize passes rewrite Linear layers and
    embedding tables, so a CNN keeps most of its work in float (a 1x1 convolution included)."""
    count = sum(1 for n in graph.nodes(op="call_function", target=CONV_OPS) if layer_weight(graph, n) is not None)
    return [f"{count} convolution layer{'s' if count > 1 else ''} left in float: the quantize passes rewrite "
            f"Linear layers and embedding tables only"] if count else []


class QuantizePass(Pass):
    """Base of the quantize passes; subclasses implement :meth:`quantize_linear`. Their Params must
    have ``skip``, ``embeddings`` and ``max_layer_error``."""

    needs_hessian: ClassVar[bool] = False  # whether quantize_linear reads InputStats.hessian

    def prepare(self, ctx: PassContext) -> list[str]:
        """Called once before the layers are quantized; returns notes for the report."""
        return []

    def quantize_linear(self, site: LinearSite, stats: InputStats) -> Quantized | str:
        """The rewrite of one Linear, or a sentence saying why it stays in float."""
        raise NotImplementedError

    def quantize_embedding(self, site: EmbeddingSite) -> tuple[Quantized, float]:
        """The rewrite of one embedding table and the table's relative error (int8 rows by default)."""
        return int8_embedding_table(site)

    def with_hessian(self) -> bool:
        return self.needs_hessian

    def sequential(self) -> bool:
        """Whether layers are quantized stage by stage, each fitted to already quantized inputs."""
        return False

    def fits_float_outputs(self) -> bool:
        """Whether layers are fitted to the float model's outputs: their statistics then pair each
        input with the one the float model gives (``InputStats.cross``), from a copy of the graph
        taken before any layer is quantized."""
        return False

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        sites, notes = find_sites(graph, self.params.skip, self.params.embeddings)
        notes += _convolutions_note(graph)
        if not any(isinstance(s, LinearSite) for s in sites):
            notes += rewritten_layers_note(graph, self.name)
            notes += products_of_weights_note(graph, "the quantize passes do not rewrite")
            notes.append("no Linear layers to quantize: the graph is unchanged")
            return PassResult(changed=False, notes=notes)
        notes += self.prepare(ctx)
        self.graph = graph
        self.errors: dict[str, float] = {}
        self.kept_float: dict[str, float] = {}
        self.rewritten: dict[fx.Node, str] = {}  # the new op of each quantized Linear, and its weight's name
        readers: dict[fx.Node, list[LinearSite]] = defaultdict(list)
        for site in sites:
            if isinstance(site, LinearSite):
                readers[site.x].append(site)
        self.siblings = {site.weight_name: group for group in readers.values() for site in group}
        reference = None
        if self.fits_float_outputs():  # layer inputs are named as in the copy until they are rewritten
            reference = (graph.copy().module, {s.node: s.x.name for s in sites if isinstance(s, LinearSite)})
        resume = Resume() if self.sequential() else None  # each stage's runs start where the last one's changes did
        fitted = {}  # the rows each layer fitted to a Hessian saw, and its input width
        for stage in quantization_stages(sites) if self.sequential() else [sites]:
            linears = {s.node: s.x for s in stage if isinstance(s, LinearSite)}
            stats = collect_input_stats(graph, linears, ctx.calibration, with_hessian=self.with_hessian(),
                                        reference=reference, resume=resume, changes_from=stage[0].node)
            if self.with_hessian():
                fitted.update({s.weight_name: (stats[s.node].rows, s.weight.shape[1]) for s in stage
                               if isinstance(s, LinearSite)})
            for site in stage:
                notes += self._quantize_site(graph, site, stats.get(site.node))
        quantized_names = set(self.rewritten.values())  # not the layers left or kept in float
        notes += few_rows_note({name: rows for name, rows in fitted.items() if name in quantized_names})
        if self.kept_float:
            notes.append(f"{len(self.kept_float)} layer(s) kept in float, their error over max_layer_error="
                         f"{self.params.max_layer_error}: "
                         + ", ".join(f"{k} ({v:.4f})" for k, v in self.kept_float.items()))
        quantized = len(self.errors) - len(self.kept_float)
        fused = fuse_siblings(graph, list(self.rewritten)) if self.params.fuse else []
        if quantized:
            graph.refresh()
        figures = {"quantized": quantized, "kept_float": self.kept_float, "layer_error": self.errors,
                   "fused": [[self.rewritten[node] for node in group] for group in fused]}
        return PassResult(changed=quantized > 0, stats={**figures, **self.extra_stats()}, notes=notes)

    def _quantize_site(self, graph: Graph, site: Any, stats: InputStats | None) -> list[str]:
        """Quantize one layer unless its error is over the budget; returns notes."""
        if isinstance(site, EmbeddingSite):
            plan, error = self.quantize_embedding(site)
            layer_input = site.indices
        else:
            plan = self.quantize_linear(site, stats)
            if isinstance(plan, str):
                return [f"{site.weight_name} left in float: {plan}"]
            error = self.layer_error(site, plan, stats)
            layer_input = site.x
        self.errors[site.weight_name] = round(error, 6)
        if self.params.max_layer_error is not None and error > self.params.max_layer_error:
            self.kept_float[site.weight_name] = round(error, 6)
            return []
        new = self._replace(graph, site, plan, layer_input)
        if isinstance(site, LinearSite):
            self.rewritten[new] = site.weight_name
        return []

    def siblings_of(self, site: LinearSite) -> list[LinearSite]:
        """The Linear layers that read the same input as ``site`` (itself included), in graph order."""
        return self.siblings[site.weight_name]

    def extra_stats(self) -> dict[str, Any]:
        """Pass-specific figures for the report."""
        return {}

    def layer_error(self, site: LinearSite, plan: Quantized, stats: InputStats) -> float:
        """Relative output error of the rewritten layer on the calibration rows it saw."""
        x = stats.sample()
        bias = self.graph.param(site.bias.target) if self.graph.is_tensor_attr(site.bias) else None
        exact = torch.nn.functional.linear(x, site.weight.float(), None if bias is None else bias.float())
        with torch.no_grad():
            return relative_error(plan.evaluate(x, bias), exact)

    @staticmethod
    def _replace(graph: Graph, site: Any, plan: Quantized, layer_input: Any) -> fx.Node:
        if plan.input_scale is not None:
            factor = graph.add_param(f"{site.weight_name}_{plan.input_scale.suffix}", plan.input_scale.tensor,
                                     before=site.node)
            with graph.fx_graph.inserting_before(site.node):
                layer_input = graph.fx_graph.call_function(torch.ops.aten.mul.Tensor, (layer_input, factor))
        args = []
        for arg in plan.args:
            if isinstance(arg, Stored):
                arg = graph.add_param(f"{site.weight_name}_{arg.suffix}", arg.tensor, before=site.node)
            elif arg is INPUT:
                arg = layer_input
            elif arg is BIAS:
                arg = site.bias
            args.append(arg)
        with graph.fx_graph.inserting_before(site.node):
            new = graph.fx_graph.call_function(plan.op, tuple(args))
        new.meta.update({k: v for k, v in site.node.meta.items() if k in ("nn_module_stack", "stack_trace")})
        graph.replace_node(site.node, new)
        return new


@dataclass
class QuantizeParams(PassParams):
    """Parameters every quantize pass takes."""

    skip: tuple[str, ...] = param((), "weight-name patterns (fnmatch, e.g. 'pooler.*') left in float")
    embeddings: bool = param(True, "also quantize float32 embedding tables (int8 rows; see embedding_bits "
                                   "of quantize.int4_weight)")
    max_layer_error: float | None = param(None, "layers whose relative output error on the calibration batches "
                                                "is above this stay in float (None: quantize all)", gt=0.0)
    fuse: bool = param(True, "fuse quantized layers that read the same input (attention's query, key and value; "
                             "a gated MLP's gate and up) into one op: the input is quantized once, one GEMM runs")
