"""The note a weight pass gives when it found nothing to act on because an earlier pass already
turned the model's Linear layers into bevel ops (quantized, 2:4 sparse): those ops hold packed
weights that pruning, factorizing and quantizing again do not read, so the pipeline's order is the
cause, not the model."""

from __future__ import annotations

from collections import Counter

from torch._ops import OpOverload

from bevel.ir.graph import Graph


def rewritten_layers_note(graph: Graph, pass_name: str) -> list[str]:
    """A note naming the Linear layers an earlier pass made into bevel ops, by op, and the order that
    would let ``pass_name`` act on them; none where there are none."""
    ops = Counter(node.target.name() for node in graph.nodes(op="call_function")
                  if isinstance(node.target, OpOverload) and node.target.namespace == "bevel"
                  and node.target.name().endswith("_linear"))
    if not ops:
        return []
    kinds = ", ".join(f"{count} {name}" for name, count in sorted(ops.items()))
    return [f"{sum(ops.values())} Linear layer(s) were already rewritten by an earlier pass ({kinds}), and "
            f"{pass_name} does not act on them: put {pass_name} before that pass in the pipeline"]
