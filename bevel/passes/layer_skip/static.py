"""``layer_skip.static``: remove the repeated blocks that change the hidden state least.

Each block (see :mod:`bevel.passes.layer_skip.blocks`) is scored on the calibration batches by how
much it changes the residual stream: the mean cosine between the hidden state entering and leaving
it (ShortGPT's Block Influence is one minus it), and the relative L2 change
``||out - in|| / ||in||`` ("Void in Language Models" skips the layers where it is small). The most
redundant blocks go: the ``n`` first of the ranking, or explicit ``layers``; with ``max_drop``, blocks
are taken in ranking order for as long as the outputs' cosine to the unskipped graph stays within
that drop. With ``compensate``, a removed block becomes a per-channel affine map ``a * x + b``,
fitted by least squares to its input and output on the calibration batches.

In a decoder's step graph a removed layer's cache input is passed through unchanged: nothing reads
it any more. The report lists every block's scores, their rank, and (``probe``) the fidelity of
the model with that block alone removed, so that the ranking can be checked against the damage.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from bevel.compiler.fidelity import compare, run_batches
from bevel.errors import ParamError
from bevel.ir.analysis import flat_outputs
from bevel.ir.graph import Graph
from bevel.passes.base import Pass, PassContext, PassParams, PassResult, param
from bevel.passes.layer_skip.blocks import Block, find_blocks
from bevel.passes.registry import register_pass

aten = torch.ops.aten


@register_pass("layer_skip.static")
class StaticLayerSkip(Pass):
    """Remove the transformer blocks that change the hidden state least on the calibration data,
    optionally replacing each by a fitted per-channel affine map."""

    @dataclass
    class Params(PassParams):
        n: int | None = param(1, "blocks to remove (with max_drop: at most this many; none: no limit)", ge=0)
        layers: list[int] | None = param(None, "remove exactly these blocks (0-based) instead of the most redundant "
                                                 "(then without n or max_drop)")
        max_drop: float | None = param(None, "remove blocks in ranking order while the outputs' cosine to the "
                                             "unskipped graph drops by at most this much", ge=0.0, le=2.0)
        score: str = param("cosine", "redundancy ranking: 'cosine' (input-output cosine, highest first) or 'l2' "
                                     "(relative L2 change, smallest first)", choices=("cosine", "l2"))
        compensate: bool = param(False, "replace each removed block by a per-channel affine map fitted on the "
                                        "calibration data")
        probe: bool = param(True, "measure the fidelity of removing each block alone (one calibration run per "
                                  "block) and report it")

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.layers is None:
                return
            if not self.layers or any(i < 0 for i in self.layers):
                raise ParamError(f"layer_skip.static(layers={self.layers}): give one or more block indices, "
                                 f"0-based", key="layers")
            # layers chooses the blocks itself: a count or a fidelity budget would be silently ignored
            if self.max_drop is not None or self.n != type(self).__dataclass_fields__["n"].default:
                given = "max_drop" if self.max_drop is not None else "n"
                raise ParamError(f"layer_skip.static takes layers=... (exactly these blocks) or n=... / max_drop=... "
                                 f"(the most redundant ones), not both; got layers={self.layers} and "
                                 f"{given}={getattr(self, given)}", key=given)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Score the blocks, choose the ones to remove, and route the residual stream around them."""
        blocks = find_blocks(graph)
        if not blocks:
            return PassResult(changed=False, notes=["no repeated blocks (transformer layers) found: nothing changed"])
        self._check_counts(len(blocks))
        usable = [b for b in blocks if b.problem == ""]
        notes = [f"block {b.index} cannot be removed: {b.problem}" for b in blocks if b.problem]
        if not usable:
            return PassResult(changed=False, notes=notes)
        stats = measure_blocks(graph, usable, ctx.calibration, ctx.padding_masks)
        ranking = sorted(usable, key=lambda b: -stats[b.index]["cosine"] if self.params.score == "cosine"
                         else stats[b.index]["rel_l2"])
        for rank, block in enumerate(ranking):
            stats[block.index]["rank"] = rank + 1  # 1 = most redundant
        reference = run_batches(graph, ctx.calibration)
        if self.params.probe:
            for block in usable:
                stats[block.index]["cosine_without_it"] = _fidelity(graph, [block], {}, ctx, reference).cosine
        chosen = self._choose(graph, blocks, ranking, stats, ctx, reference)
        # a removed layer's cache output is its input, unwritten: nothing reads it, so it is not compared
        unwritten = cache_outputs(graph, chosen)
        affine = {b.index: stats[b.index]["affine"] for b in chosen} if self.params.compensate else {}
        if chosen:
            remove_blocks(graph, chosen, affine)
        report = {i: {k: (round(v, 6) if isinstance(v, float) else v) for k, v in s.items() if k != "affine"}
                  for i, s in stats.items()}
        notes += [_describe(b, report[b.index], b in chosen) for b in usable]
        return PassResult(changed=bool(chosen), notes=notes,
                          stats={"blocks": len(blocks), "removed": sorted(b.index for b in chosen),
                                 "unused_outputs": unwritten,
                                 "compensated": self.params.compensate and bool(chosen),
                                 "ranking": [b.index for b in ranking], "per_block": report})

    def _check_counts(self, count: int) -> None:
        n, layers = self.params.n, self.params.layers
        if layers is not None:
            bad = [i for i in layers if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < count]
            if bad or len(set(layers)) != len(layers) or len(layers) >= count:
                raise ParamError(f"layer_skip.static(layers={layers}): give distinct block indices in [0, {count}), "
                                 f"fewer than the {count} blocks found", key="layers")
        elif n is not None and n >= count:
            raise ParamError(f"layer_skip.static(n={n}): the graph has {count} repeated blocks; n must be smaller "
                             f"(removing every block leaves no model)", key="n")

    def _choose(self, graph: Graph, blocks: list[Block], ranking: list[Block], stats: dict[int, dict[str, Any]],
                ctx: PassContext, reference: list) -> list[Block]:
        if self.params.layers is not None:
            by_index = {b.index: b for b in blocks}
            unusable = [i for i in self.params.layers if by_index[i].problem]
            if unusable:
                raise ParamError(f"layer_skip.static(layers=...): block(s) {unusable} cannot be removed: "
                                 f"{by_index[unusable[0]].problem}", key="layers")
            return [by_index[i] for i in self.params.layers]
        limit = len(ranking) - 1 if self.params.n is None else min(self.params.n, len(ranking))
        if self.params.max_drop is None:
            return ranking[:limit]
        chosen: list[Block] = []
        for block in ranking:
            if len(chosen) == limit:
                break
            trial = chosen + [block]
            affine = {b.index: stats[b.index]["affine"] for b in trial} if self.params.compensate else {}
            if _fidelity(graph, trial, affine, ctx, reference).drop <= self.params.max_drop:
                chosen = trial
        return chosen


def _describe(block: Block, figures: dict[str, Any], removed: bool) -> str:
    """One line of the report per block: its scores, its rank and the damage of removing it alone."""
    alone = figures.get("cosine_without_it")
    return (f"block {block.index} ({block.path}): rank {figures['rank']}, input-output cosine {figures['cosine']:.4f}, "
            f"relative L2 change {figures['rel_l2']:.4f}"
            + (f", outputs' cosine without it {alone:.4f}" if alone is not None else "")
            + (" - removed" if removed else ""))


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps per-block sums over the hidden states entering and leaving it."""

    def __init__(self, module: fx.GraphModule, blocks: list[Block]) -> None:
        super().__init__(module)
        self.blocks = blocks
        self.watch = {b.hidden_out: b for b in blocks}
        self.inputs = {b.hidden_in for b in blocks}
        self.kept: dict[fx.Node, torch.Tensor] = {}  # the interpreter frees a value after its last reader
        self.sums: dict[int, dict[str, Any]] = {b.index: {} for b in blocks}
        self.mask: torch.Tensor | None = None  # the running batch's padding mask [B, N], if the model has one

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n in self.inputs:
            self.kept[n] = result
        block = self.watch.get(n)
        if block is not None:
            x, y = self.kept[block.hidden_in].detach().double(), result.detach().double()
            if self.mask is not None and tuple(y.shape[:2]) == tuple(self.mask.shape):
                x, y = x[self.mask.bool()], y[self.mask.bool()]  # an encoder's padded tokens mean nothing
            x, y = x.reshape(-1, y.shape[-1]), y.reshape(-1, y.shape[-1])
            s = self.sums[block.index]
            # all-zero rows (padding tokens whose embedding is zero) have no direction to compare
            nonzero = (x.abs().amax(-1) > 0) & (y.abs().amax(-1) > 0)
            cosine = torch.nn.functional.cosine_similarity(x[nonzero], y[nonzero], dim=-1)
            for key, value in (("cos", cosine.sum()), ("cos_rows", torch.tensor(float(cosine.numel()))),
                               ("rows", torch.tensor(float(x.shape[0]))), ("diff2", (y - x).square().sum()),
                               ("in2", x.square().sum()), ("sx", x.sum(0)), ("sy", y.sum(0)),
                               ("sxx", x.square().sum(0)), ("sxy", (x * y).sum(0))):
                s[key] = s.get(key, 0) + value
        return result


def measure_blocks(graph: Graph, blocks: list[Block], batches: list[tuple[Any, ...]],
                   masks: list[torch.Tensor] | None = None) -> dict[int, dict[str, Any]]:
    """Per block: mean input-output cosine, relative L2 change, and the least-squares per-channel
    affine map from its input to its output (``(a, b)``), over every token of ``batches`` (the real
    ones only where ``masks`` gives each batch's padding mask)."""
    recorder = _Recorder(graph.module, blocks)
    with torch.no_grad():
        for index, batch in enumerate(batches):
            recorder.mask = None if masks is None else masks[index]
            recorder.run(*batch)
    stats = {}
    for block in blocks:
        s = recorder.sums[block.index]
        rows = s["rows"]
        mean_x, mean_y = s["sx"] / rows, s["sy"] / rows
        variance = s["sxx"] / rows - mean_x.square()
        covariance = s["sxy"] / rows - mean_x * mean_y
        # a channel that never varies gets a = 0 (its output mean is all one can fit)
        scale = torch.where(variance > 1e-12, covariance / variance.clamp(min=1e-12), torch.zeros_like(variance))
        stats[block.index] = {"cosine": float(s["cos"] / s["cos_rows"].clamp(min=1)),
                              "rel_l2": float((s["diff2"] / s["in2"]).sqrt()),
                              "affine": (scale, mean_y - scale * mean_x)}
    return stats


def remove_blocks(graph: Graph, blocks: list[Block], affine: dict[int, tuple[torch.Tensor, torch.Tensor]],
                  shapes: bool = True) -> None:
    """Route the residual stream around ``blocks`` (through ``a * x + b`` where ``affine`` has the
    block), pass their cache inputs through, and drop what no longer has users. With ``shapes``
    false the nodes' shapes are not recomputed: the graph then only runs (a trial, measured and
    dropped; recomputing them took 2.5 of the 3.3 s of each trial on tinylm)."""
    replaced: dict[fx.Node, fx.Node] = {}  # a removed block's output -> what now stands for it
    for block in sorted(blocks, key=lambda b: b.index):
        replacement: fx.Node = block.hidden_in
        while replacement in replaced:  # the block before it was removed too
            replacement = replaced[replacement]
        source = replacement
        if block.index in affine:
            dtype = block.hidden_out.meta["val"].dtype
            scale, shift = (t.to(dtype) for t in affine[block.index])
            anchor = block.hidden_out
            scale_node = graph.add_param(f"layer_skip_{block.index}_scale", scale, before=anchor)
            shift_node = graph.add_param(f"layer_skip_{block.index}_shift", shift, before=anchor)
            with graph.fx_graph.inserting_before(anchor):
                scaled = graph.fx_graph.call_function(aten.mul.Tensor, (source, scale_node))
                replacement = graph.fx_graph.call_function(aten.add.Tensor, (scaled, shift_node))
        block.hidden_out.replace_all_uses_with(replacement)
        replaced[block.hidden_out] = replacement
        for write in block.cache_writes:
            write.replace_all_uses_with(write.args[0])
        # dead-code elimination keeps side-effecting nodes (torch.export's tensor-metadata asserts)
        # and so what they read: erase the block's unread nodes, last first
        for node in reversed(block.nodes):
            if not node.users:
                graph.fx_graph.erase_node(node)
    graph.refresh(shapes=shapes)


def _fidelity(graph: Graph, blocks: list[Block], affine: dict, ctx: PassContext, reference: list):
    """The fidelity of ``graph`` without ``blocks``, measured on a copy (the graph is left intact)."""
    trial = Graph(fx.GraphModule(graph.module, copy.deepcopy(graph.fx_graph)), graph.example_inputs)
    names = {n.name: n for n in trial.fx_graph.nodes}
    moved = [Block(b.index, b.path, [names[n.name] for n in b.nodes], names[b.hidden_in.name],
                   names[b.hidden_out.name], [names[n.name] for n in b.cache_writes]) for b in blocks]
    unwritten = frozenset(cache_outputs(trial, moved))
    remove_blocks(trial, moved, affine, shapes=False)
    return compare(reference, run_batches(trial, ctx.calibration), unused=unwritten, padding=ctx.padding_masks)


def cache_outputs(graph: Graph, blocks: list[Block]) -> list[int]:
    """Positions among the graph's flat outputs of the cache tensors ``blocks`` write."""
    writes = {w for b in blocks for w in b.cache_writes}
    return [i for i, value in enumerate(flat_outputs(graph)) if value in writes]
