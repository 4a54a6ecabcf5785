"""``kv.evict``: heavy-hitter eviction during decode (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for
Efficient Generative Inference of Large Language Models").

The decode loop keeps at most ``budget`` cache entries per sequence, layer and KV head: the newest
``recent`` share of them, and the entries with the highest attention accumulated so far (the heavy
hitters; the sum over every query and every query head that read the entry). Each new token takes
the place of the entry with the least accumulated attention among the older ones. The prefill
attends to the whole prompt, as H2O does, and its attention gives the first scores; the cache is
then cut to the budget.

The step graph itself does not change (a prefill is exact); the decode loop reads the attention
mass from ``bevel::cache_attention`` (see ``bevel.runtime.cache_graph`` and ``bevel.runtime.kv_cache``).
So the report's fidelity and held-out perplexity (prefill-only measures) show no change: measure
eviction by decoding, with ``bevel.eval.decode_perplexity``.
"""

from __future__ import annotations

from dataclasses import dataclass

from bevel.errors import ParamError
from bevel.ir.attention import decoder_attention, record_policy
from bevel.ir.graph import Graph
from bevel.passes.base import Pass, PassContext, PassParams, PassResult, param
from bevel.passes.registry import register_pass


@register_pass("kv.evict")
class KVEvict(Pass):
    """Decode keeps a fixed budget of cache entries: the recent tokens and the heavy hitters with the
    most accumulated attention (H2O)."""

    conflicts = ("attention.window", "kv.evict")  # a second budget would replace the first

    @dataclass
    class Params(PassParams):
        budget: int | float = param(0.25, "cache entries kept per sequence and KV head: a count (an int >= 2) or a "
                                          "share of max_cache_len (a float in (0, 1))", gt=0)
        recent: float = param(0.5, "share of the budget kept for the newest tokens; the rest holds heavy hitters",
                              ge=0.0, le=1.0)

        def __post_init__(self) -> None:
            super().__post_init__()
            if isinstance(self.budget, float) and not self.budget < 1:
                raise ParamError(f"{self.pass_name}(budget={self.budget}): a float budget is a share of "
                                 f"max_cache_len and must be below 1; give a count as an int", key="budget")
            if isinstance(self.budget, int) and self.budget < 2:
                raise ParamError(f"{self.pass_name}(budget={self.budget}): keep at least 2 entries", key="budget")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Check the graph is a decoder's with readable attention; record the eviction policy."""
        attentions = decoder_attention(graph)
        if isinstance(attentions, str):
            return PassResult(changed=False, notes=[f"nothing changed: {attentions}"])
        budget, recent = self.params.budget, self.params.recent
        if isinstance(budget, int) and ctx.max_cache_len is not None and budget >= ctx.max_cache_len:
            return PassResult(changed=False, notes=[
                f"nothing changed: budget={budget} keeps all max_cache_len={ctx.max_cache_len} cache entries, so "
                f"nothing is ever evicted; give a budget below {ctx.max_cache_len} (or a share, such as 0.25)"])
        record_policy(graph, budget=budget, recent=recent)
        size = f"{budget} entries" if isinstance(budget, int) else f"{budget:g} of max_cache_len"
        return PassResult(changed=True, notes=[
            f"decode keeps {size} per sequence, layer and KV head ({recent:g} of them the newest tokens, the rest "
            f"the heavy hitters) over {len(attentions)} layers; the step graph is unchanged (the prefill attends "
            f"to the whole prompt), so fidelity and perplexity here do not measure eviction"],
            stats={"layers": len(attentions), "budget": budget, "recent": recent})
