"""``attention.heads``: per-head patterns chosen by calibration, without training (as DuoAttention and
RazorAttention choose them, from the attention itself).

On the calibration batches every query head's attention is measured where a window would drop keys
(queries at positions of at least ``window + sinks``): its *coverage* is the mean share of its
attention mass on the first ``sinks`` and the last ``window`` tokens. Heads covering at least
``coverage`` become streaming heads (that window and those sinks); the others, retrieval heads, keep
full attention. ``retrieval_share`` instead keeps that share of heads full, the lowest coverage
first (a fixed sparsity). Every layer's attention becomes ``bevel::sparse_attention`` with those
per-head windows, whose kernel skips the key blocks a streaming head does not reach. The cache keeps
every token (retrieval heads read them all); when every head streams, the decode loop keeps the
ring buffer of ``attention.window``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bevel.errors import ParamError, PassError
from bevel.ir.attention import Attention, decoder_attention, narrowed, record_policy, rewrite_sparse
from bevel.ir.graph import Graph
from bevel.passes.attention.common import block_param, check_block
from bevel.passes.attention.probe import visit_attention
from bevel.passes.base import Pass, PassContext, PassParams, PassResult, param
from bevel.passes.registry import register_pass
from bevel.runtime.ops.sparse_attention import allowed, positional_density

_CHUNK = 256  # queries per probability chunk


@register_pass("attention.heads")
class Heads(Pass):
    """Streaming heads (window + sinks) where calibration shows their attention stays there, full
    attention for the others (DuoAttention / RazorAttention, without training)."""

    conflicts = ("attention.window",)

    @dataclass
    class Params(PassParams):
        coverage: float = param(0.9, "a head streams when at least this share of its attention falls on the sinks "
                                     "and the window", gt=0.0, le=1.0)
        window: int = param(256, "tokens a streaming head sees back from each query, the query included", ge=1)
        sinks: int = param(4, "first tokens a streaming head also sees", ge=0)
        retrieval_share: float | None = param(None, "keep this share of heads (lowest coverage first) on full "
                                                    "attention instead of using coverage", ge=0.0, le=1.0)
        block: int = block_param()

        def __post_init__(self) -> None:
            super().__post_init__()
            check_block(self.pass_name, self.block)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Measure every head's coverage on the calibration batches, then rewrite with per-head windows."""
        attentions = decoder_attention(graph)
        if isinstance(attentions, str):
            return PassResult(changed=False, notes=[f"nothing changed: {attentions}"])
        window, sinks = self.params.window, self.params.sinks
        coverage, queries = measure_coverage(graph, attentions, ctx.calibration, window, sinks)
        if queries == 0:
            raise PassError(f"attention.heads: no calibration query is at a position of at least window + sinks = "
                            f"{window + sinks}, so no head's coverage can be measured; give longer calibration "
                            f"prompts or a smaller window")
        streaming = self._choose(coverage)
        if not bool(streaming.any()):  # every head would keep full attention: a rewrite would only add work
            layer, head = divmod(int(coverage.argmax()), coverage.shape[1])
            why = (f"retrieval_share={self.params.retrieval_share} keeps every head on full attention"
                   if self.params.retrieval_share is not None else
                   f"no head reaches coverage={self.params.coverage} (the highest, {float(coverage.max()):.3f}, is "
                   f"layer {layer}'s head {head}); lower coverage, widen the window or give retrieval_share")
            return PassResult(changed=False, notes=[f"nothing changed: {why}"],
                              stats={"streaming_heads": 0, "heads": streaming.numel(),
                                     "coverage": [c.tolist() for c in coverage]})
        for attention, heads in zip(attentions, streaming.tolist()):
            # retrieval heads keep what they saw (all tokens, or the model's own sliding window), and so do
            # streaming heads whose own window is narrower than the pass's
            windows, head_sinks = narrowed(attention, window, sinks, heads)
            rewrite_sparse(graph, attention, windows, head_sinks, attention.table,
                           attention.block if attention.table is not None else self.params.block)
        graph.refresh()
        count, total = int(streaming.sum()), streaming.numel()
        if count == total:
            record_policy(graph, window=window, sinks=sinks)
        per_layer = [f"layer {a.layer}: {int(s.sum())}/{s.numel()} streaming (coverage "
                     + ", ".join(f"{c:.3f}" for c in cov.tolist()) + ")"
                     for a, s, cov in zip(attentions, streaming, coverage)]
        density = count / total * positional_density(1024, [window], [sinks], 1) + (total - count) / total
        return PassResult(changed=True, notes=[
            f"{count} of {total} query heads stream (last {window} tokens and first {sinks}), {total - count} keep "
            f"full attention; coverage measured on {queries} calibration queries; share of causal attention "
            f"computed at 1K tokens {density:.4f}", *per_layer],
            stats={"streaming_heads": count, "heads": total, "coverage": [c.tolist() for c in coverage],
                   "streaming": streaming.tolist(), "density_1k": round(density, 6)})

    def _choose(self, coverage: torch.Tensor) -> torch.Tensor:
        """[layers, heads] booleans: which heads stream."""
        share = self.params.retrieval_share
        if share is None:
            return coverage >= self.params.coverage
        flat = coverage.reshape(-1)
        keep_full = round(share * flat.numel())
        streaming = torch.ones_like(flat, dtype=torch.bool)
        streaming[flat.argsort()[:keep_full]] = False
        return streaming.reshape(coverage.shape)


def measure_coverage(graph: Graph, attentions: list[Attention], batches: list[tuple], window: int,
                     sinks: int) -> tuple[torch.Tensor, int]:
    """[layers, heads] mean share of attention on the sinks and the window over the queries at
    positions >= window + sinks (where a window drops keys), and how many such queries there were."""
    if not attentions:
        raise ParamError("attention.heads: no attention to measure")
    layer_of = {a.node: i for i, a in enumerate(attentions)}
    sums = torch.zeros(len(attentions), attentions[0].heads, dtype=torch.float64)
    counted = [0]

    def visit(attention: Attention, values: dict[str, torch.Tensor]) -> None:
        q, key = values["q"].float(), values["key"].float()
        q_pos, kv_pos = values["q_positions"], values["kv_positions"]
        group = q.shape[1] // key.shape[1]
        key = key.repeat_interleave(group, dim=1)
        eligible = q_pos >= window + sinks  # [B, T]
        if not bool(eligible.any()):
            return
        index = layer_of[attention.node]
        if index == 0:
            counted[0] += int(eligible.sum())
        kv = kv_pos[:, None, None, :]
        for start in range(0, q.shape[2], _CHUNK):
            stop = min(start + _CHUNK, q.shape[2])
            scores = q[:, :, start:stop] @ key.transpose(-1, -2) * attention.scale
            qp = q_pos[:, None, start:stop, None]
            causal = allowed(qp, kv, torch.tensor(0), torch.tensor(0))
            near = allowed(qp, kv, torch.tensor(window), torch.tensor(sinks))
            weights = torch.softmax(scores.masked_fill(~causal, -torch.inf), dim=-1).nan_to_num(0.0)
            share = (weights * near).sum(-1)  # [B, H, c]
            mask = eligible[:, None, start:stop]
            sums[index] += (share * mask).sum(dim=(0, 2)).double()

    visit_attention(graph, attentions, batches, visit)
    return (sums / max(counted[0], 1)).float(), counted[0]
