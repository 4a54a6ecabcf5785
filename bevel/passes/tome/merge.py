"""``tome``: token merging between the attention and the MLP of every transformer block (Bolya et al.
2023, "Token Merging: Your ViT But Faster"), as a graph rewrite of any captured encoder.

Each block merges ``r`` tokens by bipartite soft matching on its attention keys averaged over heads
(``bevel::bipartite_match``), then ``bevel::merge_tokens`` takes the size-weighted average; later
attentions see ``log(size)`` in their additive mask (proportional attention), so the fused
``scaled_dot_product_attention`` stays. With a padding mask, padding is removed before any real
token is merged and never absorbs one. See :mod:`bevel.passes.tome.rewrite` for what follows the
tokens through the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bevel.errors import ParamError
from bevel.ir.graph import Graph
from bevel.ir.meta import concrete
from bevel.passes.base import Pass, PassContext, PassParams, PassResult, param
from bevel.passes.registry import register_pass
from bevel.passes.tome.blocks import AttentionBlock, find_blocks
from bevel.passes.tome.packed import merge_packed
from bevel.passes.tome.rewrite import Inserter, TokenReduction, clamping_notes, static_count_clash
from bevel.passes.tome.unpad import packing_obstacle

SCHEDULES = ("constant", "decreasing")


def per_block_r(r: int | tuple, blocks: int) -> list[int]:
    """Tokens merged in each of ``blocks`` blocks: ``r`` everywhere, a list of one r per block, or
    ``(r, "decreasing")``: from 2r in the first block down to 0 in the last, the same total as r
    everywhere (early merges save most, and late layers need their tokens most)."""
    if isinstance(r, int):
        return [r] * blocks
    if len(r) == 2 and isinstance(r[0], int) and isinstance(r[1], str):
        if r[1] == "constant" or blocks == 1:
            return [r[0]] * blocks
        return [round(2 * r[0] * (blocks - 1 - i) / (blocks - 1)) for i in range(blocks)]
    return list(r)


def check_r(pass_name: str, r: int | tuple) -> None:
    """A ParamError unless ``r`` is an int >= 0, a list of them, or ``[r, schedule]``."""
    if isinstance(r, int):
        bad = r < 0
    elif len(r) == 2 and isinstance(r[0], int) and isinstance(r[1], str):
        bad = r[0] < 0 or r[1] not in SCHEDULES
    else:
        bad = not r or not all(isinstance(v, int) and v >= 0 for v in r)
    if bad:
        raise ParamError(f"{pass_name}(r=...): {r!r} is not a token count >= 0, a list of one per block, or "
                         f"[r, schedule] with schedule one of {', '.join(map(repr, SCHEDULES))}", key="r")


@dataclass
class TokenReductionParams(PassParams):
    """The parameters every token reducing pass takes; each pass's ``Params`` adds its own."""

    r: int | tuple[int | str, ...] = param(8, "tokens removed per block: an int, a list of one per block, or "
                                           "[r, \"decreasing\"] (2r in the first block down to 0)")
    protect: int = param(1, "leading tokens never removed (the CLS token)", ge=0)
    unmerge: bool = param(True, "spread per-token outputs back to the original tokens, so their shape is kept")
    drop_padding: bool = param(True, "with a padding mask: move real tokens to the front before the first "
                               "block and cut the padding no row needs (the batch's longest row decides)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_r(self.pass_name, self.r)


@register_pass("tome")
class TokenMerging(Pass):
    """Merge similar tokens between the attention and the MLP of each transformer block (ToMe)."""

    @dataclass
    class Params(TokenReductionParams):
        prop_attn: bool = param(True, "proportional attention: a merged token weighs as the tokens it stands for")
        metric: str = param("keys", "what similarity is measured on: the attention keys averaged over heads "
                            "(ToMe), or the hidden states being merged", choices=("keys", "hidden"))
        pack: bool = param(False, "with a padding mask: pack the batch's sequences into as few rows as the longest "
                           "allows (as unpad) and merge within each sequence, r per packed row and the first "
                           "`protect` tokens of each sequence kept; the stream is unpacked after the last block, so "
                           "outputs keep their shape (unmerge and drop_padding do not apply). Fastest on padded "
                           "batches; the graph no longer exports to ONNX")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        p = self.params
        return run_planned(self.name, graph, p, bipartite_planner(p.protect), p.prop_attn, p.metric, p.pack)


def run_planned(pass_name: str, graph: Graph, params, planner, prop_attn: bool, metric: str,
                pack: bool = False) -> PassResult:
    """Find the blocks, check the schedule of ``params.r`` and reduce the tokens of every block with
    ``planner`` (see :func:`bevel.passes.tome.merge.reduce_tokens`), or with ``pack`` merge packed
    sequences where the graph allows it (see :mod:`bevel.passes.tome.packed`)."""
    blocks, skipped = find_blocks(graph)
    notes = [f"left alone: attention '{name}': {why}" for name, why in skipped]
    if not blocks:
        return PassResult(changed=False, stats={"blocks": 0}, notes=notes + [
            "no transformer block (scaled_dot_product_attention, then a residual add) found: nothing changed"])
    clash = static_count_clash(graph, blocks)
    if clash is not None:
        return PassResult(changed=False, stats={"blocks": len(blocks)}, notes=notes + [f"{clash}: nothing changed"])
    schedule = per_block_r(params.r, len(blocks))
    if len(schedule) != len(blocks):
        raise ParamError(f"{pass_name}(r=...): {len(schedule)} values given for {len(blocks)} transformer blocks",
                         key="r")
    if not any(schedule):
        return PassResult(changed=False, stats={"blocks": len(blocks), "r": schedule},
                          notes=notes + ["r is 0 in every block: nothing changed"])
    if pack:
        obstacle = packing_obstacle(graph, blocks)
        if obstacle is None:
            return merge_packed(graph, blocks, schedule, params.protect, prop_attn, metric, notes)
        notes.append(f"pack: {obstacle}; merged without packing")
    reduction = TokenReduction(graph, prop_attn, metric)
    return reduce_tokens(reduction, blocks, schedule, params.protect, params.unmerge, params.drop_padding, notes,
                         planner)


def bipartite_planner(protect: int):
    """The plan of ToMe: ``bevel::bipartite_match`` on the keys."""
    def plan(at: Inserter, block: AttentionBlock, metric, size, r: int):
        return at(torch.ops.bevel.bipartite_match.default, metric, size, r, protect)
    return plan


def reduce_tokens(reduction: TokenReduction, blocks: list[AttentionBlock], schedule: list[int], protect: int,
                  unmerge: bool, drop_padding: bool, notes: list[str], planner) -> PassResult:
    """Rewrite ``blocks`` (r from ``schedule``, blocks with r = 0 skipped), after dropping the padding
    no row needs if asked, and report the token counts at the example input size: ``tokens`` holds
    the count before, after dropping padding (when it is dropped) and after each merge."""
    graph = reduction.graph
    tokens = graph.shape(blocks[0].input)[1]
    padding = blocks[0].padding
    if padding is not None and drop_padding:
        reduction.drop_padding(blocks[0])
    for block, r in zip(blocks, schedule):
        if r:
            reduction.reduce(block, r, protect, planner)
    reshaped = [] if unmerge else reduction.per_token_outputs(tokens)
    spread = reduction.unmerge_outputs(tokens) if unmerge else []
    graph.refresh()
    counts = [concrete(tokens)] + [concrete(graph.shape(x)[1]) for x, _ in reduction.steps]
    notes += clamping_notes(counts, schedule)
    if padding is not None:
        dropped = "dropped before the first block where no row needs it, and " if drop_padding else ""
        notes.append(f"padding (input '{padding.name}') is {dropped}removed before real tokens merge; outputs at "
                     f"padded positions are not kept")
    if spread:
        notes.append(f"outputs spread back to the original tokens: {', '.join(spread)}")
    if reshaped:
        notes.append(f"per-token outputs keep the merged tokens (unmerge=False): "
                     f"{', '.join(node.name for _, node, _ in reshaped)}")
    stats = {"blocks": len(blocks), "r": schedule, "tokens": counts, "unmerged_outputs": spread,
             "reshaped_outputs": [i for i, _, _ in reshaped]}
    return PassResult(changed=True, stats=stats, notes=notes)
