"""``layer_skip.early_exit``: a token (or sample) leaves the model after block k when the model's
own final norm and head, applied to the hidden state there, already predict with confidence.

The rewrite (see :mod:`bevel.runtime.early_exit_ops` for the two ops it inserts): after block
``min_layer - 1`` and every ``every``-th block after it, up to the one before last, a copy of the
head (the nodes between the last block and the logits) computes a prediction, and
``bevel::early_exit_decide`` gives the tokens whose confidence is above ``threshold`` their exit
depth; after every later block,
``bevel::early_exit_freeze`` keeps an exited token's hidden state as it was. So the final head sees
each token's hidden state at its exit, and the blocks a token skips still compute its keys and
values from that state, which later tokens attend to (CALM's state copying, Schuster et al. 2022).
``mode="skipdecode"`` shares one exit depth per position across the batch and never lets it rise
along the sequence (Del Corro et al. 2023); skipped layers' cache entries are then never read.

The rewritten graph computes every block for every token and selects with ``where``: its outputs
are the early-exit outputs, which is what the fidelity check, ``cm.step`` and the ONNX export use.
The speed comes from the runtime (:mod:`bevel.runtime.early_exit`), which runs the graph block by
block on the rows that have not exited. The report gives the average depth on the calibration
batches (padding excluded for a decoder's prompts) and the share of tokens leaving at each depth.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from bevel.errors import ParamError
from bevel.ir.analysis import descendants, flat_outputs
from bevel.ir.graph import Graph
from bevel.passes.base import Pass, PassContext, PassParams, PassResult, param
from bevel.passes.layer_skip.blocks import Block, find_blocks
from bevel.passes.registry import register_pass
from bevel.runtime.early_exit_ops import CRITERIA

aten = torch.ops.aten
DECIDE = torch.ops.bevel.early_exit_decide.default
FREEZE = torch.ops.bevel.early_exit_freeze.default


@register_pass("layer_skip.early_exit")
class EarlyExit(Pass):
    """Exit after block k when the model's own head is confident there (CALM); per token for LMs,
    per sample for classifiers, or one depth per position with mode="skipdecode"."""

    @dataclass
    class Params(PassParams):
        threshold: float = param(0.9, "exit when the confidence of the head's prediction is above this "
                                      "(1.0: never exit)", gt=0.0, le=1.0)
        criterion: str = param("max_prob", "confidence: 'max_prob' (largest softmax probability) or 'margin' "
                                           "(largest minus second largest)", choices=CRITERIA)
        min_layer: int | None = param(None, "blocks every token runs before it may exit (none: a third of "
                                            "the blocks, at least 1)", ge=1)
        every: int = param(1, "check for an exit after every k-th block from min_layer on (each check runs the "
                              "head: fewer checks cost less, exits are coarser)", ge=1)
        mode: str = param("token", "'token': each token or sample exits on its own; 'skipdecode': one exit "
                                   "per position shared by the batch, never rising along the sequence",
                          choices=("token", "skipdecode"))

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Insert the exit heads, decisions and freezes; measure the depth on the calibration batches."""
        # numbered by position, not by module (after layer_skip.static removed layers.1, layers.2 is the
        # second block): depths, exits and the runtime's stages count blocks that run
        blocks = [dataclasses.replace(block, index=i) for i, block in enumerate(find_blocks(graph))]
        if not blocks:
            return PassResult(changed=False, notes=["no repeated blocks (transformer layers) found: nothing changed"])
        problems = [f"block {b.index} ({b.path}): {b.problem}" for b in blocks if b.problem]
        if problems:
            return PassResult(changed=False, notes=["early exit needs every block to hand one hidden state to the "
                                                    "next; nothing changed: " + "; ".join(problems[:3])])
        head = find_head(graph, blocks[-1])
        if isinstance(head, str):
            return PassResult(changed=False, notes=[f"no final norm and head to exit through: {head}; nothing changed"])
        total = len(blocks)
        first = self._min_layer(total)
        insert_exits(graph, blocks, head, first, self.params.every, self.params.threshold, self.params.criterion,
                     self.params.mode == "skipdecode")
        depths = measure_depths(graph, ctx.calibration, ctx.padding_masks)
        counts = torch.bincount(depths, minlength=total + 1)[first:].tolist() if depths.numel() else []
        average = float(depths.double().mean()) if depths.numel() else float(total)
        shares = {str(first + i): round(c / max(depths.numel(), 1), 6) for i, c in enumerate(counts) if c}
        predictions = "tokens" if head[-1].meta["val"].dim() > 2 else "samples"
        note = (f"average depth {average:.2f} of {total} blocks on {depths.numel()} calibration {predictions} "
                f"(earliest exit after {first} blocks, checked every {self.params.every}, threshold "
                f"{self.params.threshold}, {self.params.criterion}, mode {self.params.mode}); share leaving at each "
                f"depth: "
                + ", ".join(f"{d}: {s:.3f}" for d, s in shares.items()))
        return PassResult(changed=True, notes=[note],
                          stats={"blocks": total, "min_layer": first, "average_depth": round(average, 6),
                                 "depth_share": shares, "tokens": int(depths.numel()),
                                 "head": [n.name for n in head]})

    def _min_layer(self, total: int) -> int:
        first = self.params.min_layer if self.params.min_layer is not None else max(1, total // 3)
        if first >= total:
            raise ParamError(f"layer_skip.early_exit(min_layer={first}): the graph has {total} repeated blocks; "
                             f"min_layer must be smaller (exits happen after block min_layer - 1 and before the "
                             f"last)", key="min_layer")
        return first


def find_head(graph: Graph, last: Block) -> list[fx.Node] | str:
    """The nodes that turn the last block's hidden state into the prediction (the final norm and the
    head, ending at the logits output), in graph order; or why there are none."""
    (output,) = graph.nodes(op="output")
    flat = flat_outputs(graph)
    if last.hidden_out in flat:
        return (f"the model returns the last block's hidden state ({last.hidden_out.name}) itself, so it has no "
                f"head to predict with (a base model: add its task head)")
    after = descendants(last.hidden_out) - {output}
    reached = [value for value in flat if value in after]
    if len(reached) != 1:
        return (f"the last block's hidden state reaches {len(reached)} outputs, expected one prediction "
                f"(logits)")
    logits = reached[0]
    value = logits.meta.get("val")
    if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 2
            and value.shape[-1] >= 2):
        return f"the output {logits.name} computed from the last block is not a prediction over classes or tokens"
    order = {n: i for i, n in enumerate(graph.fx_graph.nodes)}
    head = sorted((n for n in after if n is logits or logits in descendants(n)), key=order.__getitem__)
    for node in head:
        for source in node.all_input_nodes:
            if source is last.hidden_out or source in after or source.op == "get_attr":
                continue
            if isinstance(source.meta.get("val"), torch.Tensor):
                inputs = ", ".join(sorted(n.name for n in _ancestors(source) if n.op == "placeholder"))
                return (f"the head reads {source.name}" + (f" (computed from the input {inputs})" if inputs else "")
                        + " besides the last block's hidden state, so it cannot be applied to another block's output")
    return head


def _ancestors(node: fx.Node) -> set[fx.Node]:
    found, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current not in found:
            found.add(current)
            stack.extend(current.all_input_nodes)
    return found


def insert_exits(graph: Graph, blocks: list[Block], head: list[fx.Node], first: int, every: int, threshold: float,
                 criterion: str, shared: bool) -> None:
    """Rewrite ``graph`` as the module docstring says: exits after blocks ``first - 1``, then every
    ``every``-th block, up to the one before last."""
    total, fx_graph = len(blocks), graph.fx_graph
    # the exits read the head's weights before the head does: where an earlier pass (quantize, lowrank)
    # left those reads just before the head, they move to the top (a weight read depends on nothing)
    anchor = next(n for n in fx_graph.nodes if n.op != "placeholder")
    reads = dict.fromkeys(s for node in head for s in node.all_input_nodes if s.op == "get_attr")  # in order
    for source in reads:
        if source is not anchor:
            anchor.prepend(source)
    stream = depth = None
    for block in blocks[first - 1:]:
        out = block.hidden_out
        anchor = out
        with fx_graph.inserting_after(anchor):
            if depth is not None:  # tokens that exited before this block keep their hidden state
                frozen = fx_graph.call_function(FREEZE, (stream, out, depth, block.index))
                _tag(frozen, block.index, "freeze")
                out.replace_all_uses_with(frozen, delete_user_cb=lambda user: user is not frozen)
                anchor = frozen
        stream = anchor
        if block.index == total - 1 or (block.index - (first - 1)) % every:
            continue
        logits = anchor = _copy_head(graph, head, blocks[-1].hidden_out, stream, anchor, block.index)
        with fx_graph.inserting_after(anchor):
            if depth is None:  # every token starts with the full depth
                first_class = fx_graph.call_function(aten.select.int, (logits, -1, 0))
                with fx_graph.inserting_after(first_class):
                    depth = fx_graph.call_function(aten.full_like.default, (first_class, total),
                                                   {"dtype": torch.int64})
                _tag(first_class, block.index, "depth")
                _tag(depth, block.index, "depth")
                anchor = depth
        with fx_graph.inserting_after(anchor):
            depth = fx_graph.call_function(DECIDE, (logits, depth, threshold, block.index + 1, criterion, shared))
        _tag(depth, block.index, "decide")
    graph.refresh()


def _copy_head(graph: Graph, head: list[fx.Node], source: fx.Node, hidden: fx.Node, anchor: fx.Node,
               block: int) -> fx.Node:
    """A copy of ``head`` reading ``hidden`` instead of ``source``, inserted after ``anchor``; returns
    its logits (the last node inserted: every other head node comes before them)."""
    mapping: dict[fx.Node, fx.Node] = {source: hidden}
    for node in head:
        with graph.fx_graph.inserting_after(anchor):
            anchor = graph.fx_graph.node_copy(node, lambda a: mapping.get(a, a))
        _tag(anchor, block, "head")
        mapping[node] = anchor
    return anchor


def _tag(node: fx.Node, block: int, role: str) -> None:
    node.meta["bevel_early_exit"] = {"block": block, "role": role}


class _DepthRecorder(fx.Interpreter):
    """Runs the graph and keeps the exit depths of its last decision, which hold every token's."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.last = [n for n in module.graph.nodes if n.target == DECIDE][-1]
        self.depth: torch.Tensor | None = None

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n is self.last:
            self.depth = result
        return result


def exit_depths(module: fx.GraphModule, inputs: tuple[Any, ...]) -> torch.Tensor:
    """The exit depth of every token (or sample) of ``inputs`` in an early-exit graph: the shape of
    its logits without their last dimension (padding included)."""
    recorder = _DepthRecorder(module)
    with torch.no_grad():
        recorder.run(*inputs)
    return recorder.depth


def measure_depths(graph: Graph, batches: list[tuple[Any, ...]],
                   masks: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The exit depth of every token of ``batches`` (1-D), real tokens only: for a decoder's step
    inputs padding slots hold position -1; an encoder's tokens are those its padding masks (one per
    batch, when it has one) mark."""
    names = [n.name for n in graph.inputs()]
    found = []
    for index, batch in enumerate(batches):
        depth = exit_depths(graph.module, batch)
        if "kv_positions" in names and "cache_position" in names and depth.dim() == 2:
            positions = batch[names.index("kv_positions")].index_select(1, batch[names.index("cache_position")])
            depth = depth[positions >= 0]
        elif masks is not None and depth.dim() == 2:
            mask = masks[index]
            if mask.shape == depth.shape:
                depth = depth[mask.bool()]
        found.append(depth.reshape(-1).cpu())
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.int64)
