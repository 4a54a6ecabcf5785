"""``unpad``: sequence packing for transformer encoders fed padded batches, as a graph rewrite.

Before the first transformer block, ``bevel::pack_sequences`` packs the real tokens of the batch
into as few rows as its longest sequence allows; every attention is then masked block-diagonally
(a token sees the tokens of its own sequence only), and after the last block the stream is
unpacked to the original [B, N, C], so whatever follows (pooling, a CLS head, per-token outputs)
reads what it read before. The blocks compute only real tokens and the padding left at the ends
of the packed rows: exact up to float rounding, and padding costs (nearly) nothing.

It needs what the token merging passes need (see :mod:`bevel.passes.tome.blocks`): blocks that
read a padding mask of one [batch, tokens] input, and positions added before the first block (as
BERT's embeddings), not inside attention. The batch and token counts must be symbolic (the
default capture): packing changes both. The packing is decided by the data at run time, which
ONNX cannot express: a graph with it does not export. The packing and unpacking
(:func:`pack_before`, :func:`unpack_after`) also serve ``tome(pack=true)``, which merges tokens
within the packed sequences (:mod:`bevel.passes.tome.packed`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from bevel.ir.analysis import descendants
from bevel.ir.arguments import find_argument, set_argument
from bevel.ir.graph import Graph
from bevel.ir.meta import concrete
from bevel.passes.base import Pass, PassContext, PassParams, PassResult
from bevel.passes.registry import register_pass
from bevel.passes.tome.blocks import ATTENTION_OPS, LAYER_NORMS, AttentionBlock, ancestors, find_blocks
from bevel.passes.tome.rewrite import (Inserter, copy_before_reshaping, count_nodes, padding_sizes, replace_count,
                                      reroute)

aten = torch.ops.aten


def block_output(graph: Graph, block: AttentionBlock) -> fx.Node | None:
    """Where ``block`` ends: the add of its stream and what its MLP made of it, or the LayerNorm
    that alone reads that add (post-norm blocks); None when there is no such add."""
    after = descendants(block.stream)
    for node in graph.nodes(op="call_function"):
        if node.target != aten.add.Tensor or node not in after:
            continue
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        if block.stream in operands and any(a is not block.stream and a in after for a in operands):
            users = list(node.users)
            if len(users) == 1 and users[0].op == "call_function" and users[0].target in LAYER_NORMS:
                return users[0]
            return node
    return None


@dataclass
class PackedStream:
    """The packed stream of a graph, as :func:`pack_before` leaves it."""

    x: fx.Node          # the packed tokens [R, W, C]
    segment: fx.Node    # each packed position's sequence [R, W] (-1: padding)
    source: fx.Node     # each original token's packed position, flattened [B, N]
    sizes: list[fx.Node]  # the original batch and token counts, read before packing
    width: fx.Node      # the packed token count W, which the packed region reads
    made_sizes: set[fx.Node]  # the count nodes made (no recorded value until the graph is refreshed)


def pack_before(graph: Graph, first: AttentionBlock, end: fx.Node, batch, tokens) -> PackedStream:
    """Pack the stream before ``first`` and make every node up to ``end`` (the end of the last
    block) work on the packed rows: their counts, and every attention's mask block-diagonal (a
    token sees its own sequence; padding sees padding, so no row of the softmax is empty)."""
    at = Inserter(graph, first.input)
    sizes = [at(aten.sym_size.int, first.input, dim) for dim in (0, 1)]  # the original counts, for unpacking
    packed = at(torch.ops.bevel.pack_sequences.default, first.input, padding_sizes(at, first.padding))
    x, segment, source = (at(operator.getitem, packed, i) for i in range(3))
    rows, width = at(aten.sym_size.int, x, 0), at(aten.sym_size.int, x, 1)
    same = at(aten.eq.Tensor, at(aten.unsqueeze.default, segment, 2), at(aten.unsqueeze.default, segment, 1))
    mask = at(aten.unsqueeze.default, same, 1)  # [R, 1, W, W]
    made = set(at.made)
    reroute(first.input, x, at.made)
    # the packed region: from the packing to the end of the last block
    region = (descendants(x) & (ancestors(end) | {end})) - made
    for node in region:
        copy_before_reshaping(graph, node)
    made_sizes = {rows, width}
    for old, new in ((batch, rows), (tokens, width)):
        for count in count_nodes(graph, old):
            replace_count(graph, region, count, new, made_sizes)
    for node in region:
        if node.target in ATTENTION_OPS:
            found = find_argument(node, "attn_mask")
            set_argument(node, found[0] if found is not None else "attn_mask", mask)
    return PackedStream(x, segment, source, sizes, width, made_sizes)


def unpack_after(graph: Graph, end: fx.Node, packed: PackedStream, channels: int,
                 merged_source: fx.Node | None = None) -> None:
    """Make everything after ``end`` read the stream unpacked to the original [B, N, C]; with
    ``merged_source`` (each packed position's slot after token merging, [R, W]), first spread the
    merged tokens back to the packed positions."""
    if isinstance(channels, torch.SymInt) and is_concrete_int(channels):
        channels = int(channels)  # the feature size of a model's input is a SymInt of fixed value
    back = Inserter(graph, end)
    value = end if merged_source is None else back(torch.ops.bevel.unmerge_tokens.default, end, merged_source)
    flat = back(aten.reshape.default, value, [-1, channels])
    picked = back(aten.index_select.default, flat, 0, back(aten.reshape.default, packed.source, [-1]))
    unpacked = back(aten.reshape.default, picked, [packed.sizes[0], packed.sizes[1], channels])
    unpacking = set(back.made)
    end.replace_all_uses_with(unpacked, delete_user_cb=lambda user: user not in unpacking)


def packing_obstacle(graph: Graph, blocks: list[AttentionBlock]) -> str | None:
    """Why the stream of ``blocks`` cannot be packed, or None: packing needs a padding mask, the end
    of the last block, and symbolic batch and token counts (packing changes both)."""
    first, last = blocks[0], blocks[-1]
    if first.padding is None:
        return "the attention has no padding mask"
    end = block_output(graph, last)
    if end is None or graph.shape(end) is None or len(graph.shape(end)) != 3:
        return f"the end of the last block (after attention '{last.attention.name}') was not found"
    batch, tokens, _ = graph.shape(first.input)
    if not (isinstance(batch, torch.SymInt) and isinstance(tokens, torch.SymInt)):
        return "the batch and token counts are fixed in this graph (captured with static shapes), and packing " \
               "changes both"
    return None


@register_pass("unpad")
class Unpad(Pass):
    """Pack the sequences of a padded batch into as few rows as the longest allows (exact)."""

    @dataclass
    class Params(PassParams):
        pass

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        blocks, skipped = find_blocks(graph)
        notes = [f"left alone: attention '{name}': {why}" for name, why in skipped]
        if not blocks:
            return PassResult(changed=False, stats={"blocks": 0}, notes=notes + [
                "no transformer block (scaled_dot_product_attention, then a residual add) found: nothing changed"])
        obstacle = packing_obstacle(graph, blocks)
        if obstacle is not None:
            return PassResult(changed=False, stats={"blocks": len(blocks)},
                              notes=notes + [f"{obstacle}: nothing changed"])
        first, end = blocks[0], block_output(graph, blocks[-1])
        batch, tokens, channels = graph.shape(first.input)
        counts = {"sequences": concrete(batch), "tokens": concrete(tokens)}
        packed = pack_before(graph, first, end, batch, tokens)
        unpack_after(graph, end, packed, channels)
        graph.refresh()
        rows, width = (concrete(s) for s in graph.shape(packed.x)[:2])
        counts.update(rows=rows, width=width)
        notes.append(f"{counts['sequences']} sequences of {counts['tokens']} tokens packed into {rows} rows of "
                     f"{width} at the example inputs; every attention of the {len(blocks)} blocks masked to its own "
                     f"sequence, the stream unpacked after '{end.name}'; outputs at padded positions are not kept")
        return PassResult(changed=True, stats={"blocks": len(blocks), **counts}, notes=notes)
