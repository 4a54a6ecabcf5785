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
ONNX cannot express: a graph with it does not export.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from bevel.ir.analysis import descendants
from bevel.ir.arguments import find_argument, set_argument
from bevel.ir.graph import Graph
from bevel.ir.meta import concrete
from bevel.passes.base import Pass, PassContext, PassParams, PassResult
from bevel.passes.registry import register_pass
from bevel.passes.tome.blocks import ATTENTION_OPS, LAYER_NORMS, AttentionBlock, ancestors, find_blocks
from bevel.passes.tome.rewrite import Inserter, copy_before_reshaping, count_nodes, padding_sizes, replace_count

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


@register_pass("unpad")
class Unpad(Pass):
    """Pack the sequences of a padded batch into as few rows as the longest allows (exact)."""

    @dataclass
    class Params(PassParams):
        pass

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        blocks, skipped = find_blocks(graph)
        notes = [f"left alone: attention '{name}': {why}" for name, why in skipped]

        def unchanged(why: str) -> PassResult:
            return PassResult(changed=False, stats={"blocks": len(blocks)}, notes=notes + [why])

        if not blocks:
            return unchanged("no transformer block (scaled_dot_product_attention, then a residual add) found: "
                             "nothing changed")
        first, last = blocks[0], blocks[-1]
        if first.padding is None:
            return unchanged("the attention has no padding mask: nothing to unpad")
        end = block_output(graph, last)
        if end is None or graph.shape(end) is None or len(graph.shape(end)) != 3:
            return unchanged(f"the end of the last block (after attention '{last.attention.name}') was not found: "
                             f"nothing changed")
        batch, tokens, channels = graph.shape(first.input)
        if not (isinstance(batch, torch.SymInt) and isinstance(tokens, torch.SymInt)):
            return unchanged("the batch and token counts are fixed in this graph (captured with static shapes), and "
                             "packing changes both: nothing changed")
        counts = {"sequences": concrete(batch), "tokens": concrete(tokens),
                  "padding_input": graph.inputs().index(first.padding)}  # for the fidelity check
        packed, original = self._pack(graph, first, end, batch, tokens, channels)
        graph.refresh()
        rows, width = (concrete(s) for s in graph.shape(packed)[:2])
        counts.update(rows=rows, width=width)
        notes.append(f"{counts['sequences']} sequences of {counts['tokens']} tokens packed into {rows} rows of "
                     f"{width} at the example inputs; every attention of the {len(blocks)} blocks masked to its own "
                     f"sequence, the stream unpacked after '{original}'; outputs at padded positions are not kept")
        return PassResult(changed=True, stats={"blocks": len(blocks), **counts}, notes=notes)

    @staticmethod
    def _pack(graph: Graph, first: AttentionBlock, end: fx.Node, batch, tokens, channels: int) -> tuple[fx.Node, str]:
        """Insert the packing before ``first`` and the unpacking after ``end``; returns the packed
        stream node and the name of the node unpacked."""
        at = Inserter(graph, first.input)
        sizes = [at(aten.sym_size.int, first.input, dim) for dim in (0, 1)]  # the original counts, for unpacking
        packed = at(torch.ops.bevel.pack_sequences.default, first.input, padding_sizes(at, first.padding))
        x, segment, source = (at(operator.getitem, packed, i) for i in range(3))
        rows, width = at(aten.sym_size.int, x, 0), at(aten.sym_size.int, x, 1)
        same = at(aten.eq.Tensor, at(aten.unsqueeze.default, segment, 2), at(aten.unsqueeze.default, segment, 1))
        mask = at(aten.unsqueeze.default, same, 1)  # [R, 1, W, W]: padding sees padding, so no row is empty
        made = set(at.made)
        first.input.replace_all_uses_with(x, delete_user_cb=lambda user: user not in made)
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
        back = Inserter(graph, end)
        flat = back(aten.reshape.default, end, [-1, channels])
        picked = back(aten.index_select.default, flat, 0, back(aten.reshape.default, source, [-1]))
        unpacked = back(aten.reshape.default, picked, [sizes[0], sizes[1], channels])
        unpacking = set(back.made)
        end.replace_all_uses_with(unpacked, delete_user_cb=lambda user: user not in unpacking)
        return x, end.name
