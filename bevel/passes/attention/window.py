"""``attention.window``: sliding-window attention with attention sinks (Xiao et al. 2024, "Efficient
Streaming Language Models with Attention Sinks").

Every layer's attention becomes ``bevel::sparse_attention`` where each query sees the ``window``
most recent tokens (itself included) and the first ``sinks`` tokens of its sequence, by position, in
the prefill and in every decode step. The decode loop then keeps a ring buffer of ``sinks + window``
slots per sequence and layer (see ``bevel.runtime.kv_cache``): memory stops growing with the
generated length while every token keeps its true position. A layer whose model slides a window of
its own at most ``window`` wide keeps that window, without sinks (the pass narrows attention, never
widens it); the report names those layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from bevel.ir.attention import decoder_attention, narrowed, record_policy, rewrite_sparse
from bevel.ir.graph import Graph
from bevel.passes.attention.common import block_param, check_block
from bevel.passes.base import Pass, PassContext, PassParams, PassResult, param
from bevel.passes.registry import register_pass
from bevel.runtime.ops.sparse_attention import positional_density


@register_pass("attention.window")
class Window(Pass):
    """Each query sees the last `window` tokens and the first `sinks` (StreamingLLM); decode keeps a
    ring buffer of sinks + window cache slots."""

    # a second window would replace the first one (the last wins), not narrow it
    conflicts = ("attention.heads", "kv.evict", "attention.window")

    @dataclass
    class Params(PassParams):
        window: int = param(256, "tokens each query sees back from itself, itself included", ge=1)
        sinks: int = param(4, "first tokens of the sequence every query also sees (attention sinks)", ge=0)
        block: int = block_param()

        def __post_init__(self) -> None:
            super().__post_init__()
            check_block(self.pass_name, self.block)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Rewrite every layer's attention; record the ring buffer for the decode loop."""
        attentions = decoder_attention(graph)
        if isinstance(attentions, str):
            return PassResult(changed=False, notes=[f"nothing changed: {attentions}"])
        window, sinks = self.params.window, self.params.sinks
        own = {}  # layer -> the narrower window of its own that it keeps
        for attention in attentions:
            windows, layer_sinks = narrowed(attention, window, sinks)
            if windows != [window]:
                own[attention.layer] = windows[0]
            # a block table from attention.block_sparse stays: the window applies inside its blocks
            rewrite_sparse(graph, attention, windows, layer_sinks, attention.table,
                           attention.block if attention.table is not None else self.params.block)
        graph.refresh()
        # the ring buffer holds the pass's window and sinks; a layer keeping a narrower window reads less of it
        record_policy(graph, window=window, sinks=sinks)
        density = {str(n): round(positional_density(n, [window], [sinks], 1), 4) for n in (1024, 4096, 32768)}
        notes = [f"{len(attentions)} layers: each query sees its last {window} tokens and the first {sinks}; "
                 f"decode keeps a ring buffer of {window + sinks} cache slots per sequence; share of causal attention "
                 f"computed at 1K / 4K / 32K tokens: {density['1024']} / {density['4096']} / {density['32768']}"]
        if own:
            notes.append(f"layers {', '.join(map(str, own))} keep the model's own sliding window "
                         f"({', '.join(sorted({str(w) for w in own.values()}))} tokens, no wider than {window}), "
                         f"without sinks")
        return PassResult(changed=True, notes=notes,
            stats={"layers": len(attentions), "ring_slots": window + sinks, "density": density,
                   "own_window_layers": sorted(own)})
