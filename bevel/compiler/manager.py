"""The pass manager: checks a pipeline's order, then runs each pass inside its instruments.

Instruments around every pass: wall time, graph lint, params/bytes/FLOPs/sparsity before and after,
and the fidelity check against the original model. A pass that raises, leaves a malformed graph,
or breaks the fidelity budget is rolled back, and its report entry says why.
"""

from __future__ import annotations

import logging
import time
import traceback
from typing import Callable

import torch

from bevel.compiler.fidelity import Fidelity, HeldOut, compare, run_batches
from bevel.compiler.pipeline import check_composition
from bevel.compiler.report import GraphFigures, PassReport
from bevel.errors import PipelineError
from bevel.ir import analysis
from bevel.ir.graph import MADE_BY, Graph
from bevel.passes.base import Pass, PassContext

log = logging.getLogger("bevel")

# Called before each pass with (index, count, pass) and after with (index, count, pass, entry).
ProgressHook = Callable[..., None]


def check_order(passes: list[Pass], has_calibration: bool) -> None:
    """Refuse a pipeline whose declared needs, requirements or conflicts are not met, before any work."""
    for p in passes:
        if p.needs_calibration and not has_calibration:
            raise PipelineError(f"pass '{p.name}' needs calibration data: pass calibration=[batch, ...] "
                                f"(or --calibration on the command line)")
    check_composition(passes)


def measure_figures(graph: Graph) -> GraphFigures:
    """Params, bytes, FLOPs and layer-weight sparsity of ``graph``."""
    return GraphFigures(params=analysis.param_count(graph), bytes=analysis.param_bytes(graph),
                        flops=analysis.total_flops(graph), sparsity=analysis.weight_sparsity(graph))


class PassManager:
    """Runs passes in order over one graph, keeping each rewrite only if it passes the instruments."""

    def __init__(self, passes: list[Pass], ctx: PassContext, reference_outputs: list,
                 on_start: ProgressHook | None = None, on_end: ProgressHook | None = None,
                 evaluate: Callable[[Graph], dict[str, float]] | None = None, held_out: HeldOut | None = None
                 ) -> None:
        self.passes = passes
        self.evaluate = evaluate  # task measures (held-out perplexity) after each applied pass
        self.held_out = held_out  # validation batches: the fidelity on them after each applied pass
        self.ctx = ctx
        self.reference = reference_outputs
        self.reshaped: frozenset[int] = frozenset()  # flat outputs an applied pass changed the shape of
        self.unused: frozenset[int] = frozenset()  # flat outputs an applied pass made meaningless
        self.on_start = on_start
        self.on_end = on_end

    def run(self, graph: Graph) -> tuple[Graph, list[PassReport]]:
        """Run every pass; returns the final graph (a rolled-back pass leaves its input) and the entries."""
        entries = []
        figures = measure_figures(graph)
        for node in graph.fx_graph.nodes:  # captured: made by no pass
            node.meta.setdefault(MADE_BY, None)
        for index, p in enumerate(self.passes):
            if self.on_start:
                self.on_start(index, len(self.passes), p)
            graph, entry = self._run_one(p, graph, figures)
            if self.evaluate is not None and entry.status == "applied":
                entry.quality.update(self.evaluate(graph))
            figures = entry.after
            log.info("%s: %s in %.2f s%s", entry.name, entry.status, entry.seconds,
                     f" ({entry.reason})" if entry.reason else "")
            entries.append(entry)
            if self.on_end:
                self.on_end(index, len(self.passes), p, entry)
        return graph, entries

    def _run_one(self, p: Pass, graph: Graph, before: GraphFigures) -> tuple[Graph, PassReport]:
        inputs = self.ctx.calibration, self.ctx.example_inputs
        graph, entry = self._try(p, graph, before)
        if entry.status in ("rolled back", "failed"):
            # a pass that resizes graph inputs (a decoder's cache) gives the context new batches for them
            self.ctx.calibration, self.ctx.example_inputs = inputs
        return graph, entry

    def _try(self, p: Pass, graph: Graph, before: GraphFigures) -> tuple[Graph, PassReport]:
        name = repr(p)
        snapshot = graph.copy()
        torch.manual_seed(self.ctx.seed)
        start = time.perf_counter()
        try:
            result = p.run(graph, self.ctx)
        except Exception as error:  # a failing pass must not take the compile down with it
            return snapshot, self._failed(name, error, time.perf_counter() - start, before)
        seconds = time.perf_counter() - start
        for node in graph.fx_graph.nodes:  # the nodes this pass made, for errors that name their pass
            node.meta.setdefault(MADE_BY, p.name)
        start = time.perf_counter()
        try:
            problems = graph.lint()
            reshaped = self.reshaped | frozenset(result.stats.get("reshaped_outputs", ()))
            unused = self.unused | frozenset(result.stats.get("unused_outputs", ()))
            fidelity = None if problems else self.fidelity(graph, reshaped, unused)
        except Exception as error:  # the rewritten graph does not run on the calibration batches
            return snapshot, PassReport(name, "rolled back", seconds, before, before,
                                        check_seconds=time.perf_counter() - start, stats=result.stats,
                                        notes=result.notes,
                                        reason=f"the rewritten graph fails on the calibration batches: "
                                               f"{_exception_text(error)}")
        check_seconds = time.perf_counter() - start
        if problems:
            return snapshot, PassReport(name, "rolled back", seconds, before, before, check_seconds=check_seconds,
                                        reason="the rewritten graph is malformed: " + "; ".join(problems[:3]))
        after = measure_figures(graph)
        budget = self.ctx.max_fidelity_drop
        if budget is not None and fidelity.drop > budget:
            reason = (f"fidelity drop {fidelity.drop:.4g} (cosine {fidelity.cosine:.5f}) exceeds "
                      f"max_fidelity_drop={budget}")
            return snapshot, PassReport(name, "rolled back", seconds, before, before, fidelity=fidelity,
                                        check_seconds=check_seconds, reason=reason, stats=result.stats,
                                        notes=result.notes)
        quality = {}
        if self.held_out is not None and result.changed:
            try:
                quality = self.held_out.measure(graph, reshaped, unused)
            except Exception as error:  # runs on the calibration batches, not on the validation ones
                return snapshot, PassReport(name, "rolled back", seconds, before, before, fidelity=fidelity,
                                            check_seconds=time.perf_counter() - start, stats=result.stats,
                                            notes=result.notes,
                                            reason=f"the rewritten graph fails on the validation batches: "
                                                   f"{_exception_text(error)}")
            check_seconds = time.perf_counter() - start
        status = "applied" if result.changed else "no change"
        self.reshaped, self.unused = reshaped, unused
        return graph, PassReport(name, status, seconds, before, after, fidelity=fidelity,
                                 check_seconds=check_seconds, stats=result.stats, notes=result.notes,
                                 quality=quality)

    @staticmethod
    def _failed(name: str, error: Exception, seconds: float, before: GraphFigures) -> PassReport:
        detail = _exception_text(error)
        log.warning("pass %s failed and was rolled back: %s", name, detail)
        return PassReport(name, "failed", seconds, before, before, reason=detail)

    def fidelity(self, graph: Graph, reshaped: frozenset[int] = frozenset(),
                 unused: frozenset[int] = frozenset()) -> Fidelity:
        """The graph's outputs on the calibration batches against the original model's (per-token
        outputs at real positions only, where the model has a padding mask)."""
        outputs = run_batches(graph, self.ctx.calibration)
        return compare(self.reference, outputs, reshaped, unused, self.ctx.padding_masks)


def _exception_text(error: BaseException) -> str:
    """``Type: message``, as a traceback's last line shows it."""
    return "".join(traceback.format_exception_only(type(error), error)).strip()
