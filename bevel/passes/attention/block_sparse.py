"""``attention.block_sparse``: block-sparse prefill attention from estimated important key blocks (the
block-sparse pattern of MInference, Jiang et al. 2024).

Before every layer's attention, ``bevel::estimate_attention_blocks`` pools the queries and keys of
each block of ``block`` tokens, estimates how much attention each query block gives each key block,
and keeps the sink, diagonal and ``local`` blocks plus the best others, by ``density`` (a share of
the reachable blocks) or ``threshold`` (the estimated attention mass to cover);
``bevel::sparse_attention`` then computes only those blocks. Steps with fewer queries than a block
(decode steps, short prompts) attend to every block. The report gives the share of causal
attention actually computed on the calibration batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bevel.errors import ParamError
from bevel.ir.attention import Attention, decoder_attention, positions, rewrite_sparse
from bevel.ir.graph import Graph
from bevel.passes.attention.common import block_param, check_block
from bevel.passes.attention.probe import visit_attention
from bevel.passes.base import Pass, PassContext, PassParams, PassResult, param
from bevel.passes.registry import register_pass
from bevel.runtime.ops.attention_blocks import element_density


@register_pass("attention.block_sparse")
class BlockSparse(Pass):
    """Prefill computes only the key blocks that pooled queries and keys estimate important, plus the
    sink, diagonal and local blocks (MInference's block-sparse pattern)."""

    conflicts = ("kv.quantize",)

    @dataclass
    class Params(PassParams):
        block: int = block_param()
        density: float | None = param(None, "keep this share of the key blocks each query block can reach (the "
                                            "best estimated ones); give this or threshold", gt=0.0, le=1.0)
        threshold: float | None = param(None, "keep the best estimated key blocks until they hold this share of "
                                              "the estimated attention; give this or density", gt=0.0, le=1.0)
        sinks: int = param(1, "key blocks holding one of the first `sinks` positions are always kept", ge=0)
        local: int = param(1, "key blocks before the diagonal one that are always kept", ge=0)

        def __post_init__(self) -> None:
            super().__post_init__()
            check_block(self.pass_name, self.block)
            if (self.density is None) == (self.threshold is None):
                raise ParamError(f"{self.pass_name}: give density=... or threshold=... (exactly one), e.g. "
                                 f"{self.pass_name}(density=0.3)", key="density")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Insert the block estimate and the sparse attention at every layer; measure the density."""
        attentions = decoder_attention(graph)
        if isinstance(attentions, str):
            return PassResult(changed=False, notes=[f"nothing changed: {attentions}"])
        p = self.params
        q_positions, kv_positions = positions(graph)
        for attention in attentions:
            with graph.fx_graph.inserting_before(attention.node):
                table = graph.fx_graph.call_function(torch.ops.bevel.estimate_attention_blocks.default, (
                    attention.q, attention.key, q_positions, kv_positions, p.block, p.density or 0.0,
                    p.threshold or 0.0, p.sinks, p.local, attention.scale))
            rewrite_sparse(graph, attention, attention.window, attention.sinks, table, p.block)
        graph.refresh()
        density = measure_density(graph, attentions, ctx.calibration)
        rule = f"density {p.density}" if p.density is not None else f"threshold {p.threshold}"
        notes = [f"{len(attentions)} layers: blocks of {p.block} tokens chosen by {rule} (sink and diagonal blocks "
                 f"and {p.local} local block(s) always kept); share of causal attention computed on the calibration "
                 f"batches: {density:.4f}"]
        if density == 1.0:  # applied, yet computing all that dense attention does
            longest = max(batch[0].shape[-1] for batch in ctx.calibration)
            always = (-(-p.sinks // p.block) + p.local + 1) * p.block  # tokens the kept blocks always cover
            notes.append(f"no key block was skipped on the calibration prompts (up to {longest} tokens): " + (
                f"the sink, diagonal and local blocks are all there is in prompts up to {always} tokens, so only "
                f"longer prompts compute less than dense attention; calibrate on prompts as long as those served "
                f"to see the share they compute" if longest <= always else
                f"the {rule} kept every key block; a lower one skips some"))
        return PassResult(changed=True, notes=notes, stats={"layers": len(attentions), "density": round(density, 6)})


def measure_density(graph: Graph, attentions: list[Attention], batches: list[tuple]) -> float:
    """The share of causally visible (query, key) pairs the sparse attentions compute on ``batches``,
    over every layer and head."""
    shares: list[float] = []

    def visit(attention: Attention, values: dict[str, torch.Tensor]) -> None:
        shares.append(element_density(values["table"], values["q_positions"], values["kv_positions"],
                                      attention.window, attention.sinks, attention.block))

    visit_attention(graph, attentions, batches, visit)
    return sum(shares) / len(shares) if shares else 1.0
