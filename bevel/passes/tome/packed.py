"""Token merging on packed sequences: ``tome(pack=true)`` on a padded batch.

The batch is first packed as ``unpad`` packs it (:func:`bevel.passes.tome.unpad.pack_before`):
the real tokens of all sequences in as few rows as the longest sequence allows, so padding costs
(nearly) nothing. Each block then merges ``r`` tokens per packed row with
``bevel::bipartite_match_packed``, which matches tokens of the same sequence only and protects the
first ``protect`` tokens of each sequence; the merged tokens' sequences are kept in ``segment``
(the sequence of a slot is that of the real tokens merged into it, -1 for padding), and every
later attention is masked to the token's own sequence with ``log(size)`` added (proportional
attention). After the last block the tokens are spread back to their packed positions and
unpacked to the original [B, N, C], so pooling and per-token outputs read what they read before,
and a mean over the original tokens is the size-weighted mean of the merged ones.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from bevel.ir.graph import Graph
from bevel.ir.meta import concrete
from bevel.passes.base import PassResult
from bevel.passes.tome.blocks import AttentionBlock
from bevel.passes.tome.rewrite import Inserter, TokenReduction, clamping_notes
from bevel.passes.tome.unpad import PackedStream, block_output, pack_before, unpack_after

aten = torch.ops.aten
bevel_ops = torch.ops.bevel


class PackedTokenReduction(TokenReduction):
    """A :class:`TokenReduction` of packed rows: matching and masks keep the sequences apart."""

    def __init__(self, graph: Graph, prop_attn: bool, metric: str, packed: PackedStream) -> None:
        super().__init__(graph, prop_attn, metric)
        self.segment = packed.segment
        at = Inserter(graph, packed.source)
        self.size = at(aten._to_copy.default, at(aten.ge.Scalar, packed.segment, 0), dtype=torch.float32)
        # the graph is not refreshed before the merges (that would drop the source map, unused until
        # the unpacking): the count nodes made by the packing are known by the set they are in
        self.count, self.made_sizes = [packed.width], packed.made_sizes

    def reduce(self, block: AttentionBlock, r: int, protect: int, planner=None) -> None:
        """Merge ``r`` tokens per packed row after ``block``'s attention, within sequences."""
        stream = block.stream
        at = Inserter(self.graph, stream)
        metric = at(aten.mean.dim, block.keys, [1]) if self.metric == "keys" else stream
        dest = at(bevel_ops.bipartite_match_packed.default, metric, self.size, self.segment, r, protect)
        merged = at(bevel_ops.merge_tokens.default, stream, self.size, dest, r, protect)
        x, size = at(operator.getitem, merged, 0), at(operator.getitem, merged, 1)
        # a slot's sequence: that of the real tokens merged into it (all of one sequence), else -1
        # (padding's segment, which only padding-only slots keep)
        empty = at(aten.full_like.default, size, -1, dtype=torch.int64)
        self.segment = at(aten.scatter_reduce.two, empty, 1, dest, self.segment, "amax")
        self._follow(at, stream, x, size, dest)

    def _mask(self, at: Inserter, size: fx.Node, attention: fx.Node) -> fx.Node:
        """The additive mask [R, 1, M, M]: a token sees its own sequence's tokens, with log(size)
        added under ``prop_attn``; padding sees padding (at a finite weight), so no softmax row is
        empty and no NaN reaches a merge."""
        same = at(aten.eq.Tensor, at(aten.unsqueeze.default, self.segment, 2),
                  at(aten.unsqueeze.default, self.segment, 1))
        if self.prop_attn:
            weight = at(aten.clamp_min.default, size, torch.finfo(torch.float32).tiny)
            bias = at(aten.unsqueeze.default, at(aten.log.default, weight), 1)
            mask = at(aten.where.ScalarOther, same, bias, -torch.inf)
        else:
            mask = same
        mask = at(aten.unsqueeze.default, mask, 1)
        dtype = self.graph.dtype(attention.args[0])
        if not self.prop_attn or dtype in (None, torch.float32):
            return mask
        return at(aten._to_copy.default, mask, dtype=dtype)


def merge_packed(graph: Graph, blocks: list[AttentionBlock], schedule: list[int], protect: int, prop_attn: bool,
                 metric: str, notes: list[str]) -> PassResult:
    """Pack the stream, merge ``schedule[i]`` tokens per row in block i within sequences, and
    unpack after the last block (see the module docstring). The caller has checked that packing is
    possible (:func:`bevel.passes.tome.unpad.packing_obstacle`)."""
    first, end = blocks[0], block_output(graph, blocks[-1])
    batch, tokens, channels = graph.shape(first.input)
    stats = {"blocks": len(blocks), "r": schedule, "sequences": concrete(batch)}
    packed = pack_before(graph, first, end, batch, tokens)
    reduction = PackedTokenReduction(graph, prop_attn, metric, packed)
    for block, r in zip(blocks, schedule):
        if r:
            reduction.reduce(block, r, protect)
    unpack_after(graph, end, packed, channels, merged_source=reduction.source)
    graph.refresh()
    rows, width = (concrete(s) for s in graph.shape(packed.x)[:2])
    counts = [concrete(tokens), width] + [concrete(graph.shape(x)[1]) for x, _ in reduction.steps]
    stats.update(rows=rows, width=width, tokens=counts, unmerged_outputs=[], reshaped_outputs=[])
    notes += clamping_notes(counts[1:], schedule)
    notes.append(f"{stats['sequences']} sequences of {counts[0]} tokens packed into {rows} rows of {width} at the "
                 f"example inputs, merged within each sequence down to {counts[-1]} tokens per row (the first "
                 f"{protect} of each sequence protected), and unpacked after '{end.name}'; outputs at padded "
                 f"positions are not kept")
    return PassResult(changed=True, stats=stats, notes=notes)
