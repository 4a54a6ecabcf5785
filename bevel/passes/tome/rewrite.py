"""Rewriting a graph so that its token count falls block by block: the part every token reducing pass shares.

At each chosen block a *plan* (each token's slot, ``dest`` [B, N]) is made from a metric, the
block's keys averaged over heads (as ToMe) or the stream's own tokens, and ``bevel::merge_tokens``
applies it to the residual stream. With a padding mask, ``bevel::drop_padding`` may first move the
real tokens to the front before the first block and cut the padding no row needs. Three things
travel with the tokens from then on:

- ``size`` [B, N]: how many original tokens each one stands for (0: padding). It starts from the
  padding mask the attention reads (1 for real tokens, 0 for padding) or at ones, and replaces the
  attention mask of every later attention by ``log(size)`` (proportional attention: a merged
  token counts as the tokens it stands for; padding gets -inf, as before).
- the token count: every later node that sized something by the old count (a ``view`` of the
  heads, an ``expand``) gets the merged count instead, read from the merged tensor at run time.
- ``source`` [B, L]: each original token's slot, so that per-token outputs can be spread back to
  the original length at the end (``unmerge``).
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx

from bevel.ir.arguments import find_argument, set_argument
from bevel.ir.graph import Graph
from bevel.ir.analysis import VIEW_OPS, descendants
from bevel.passes.tome.blocks import AttentionBlock, ATTENTION_OPS, same_size

aten = torch.ops.aten
bevel_ops = torch.ops.bevel

# ops whose list arguments are sizes: a size equal to the old token count becomes the new count
SHAPE_OPS = (*VIEW_OPS, aten.expand.default,
             aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default, aten.new_full.default,
             aten.zeros.default, aten.ones.default, aten.empty.memory_format, aten.full.default)

# (inserter, block, metric [B, N, d], size [B, N], r) -> the plan, inserted with the inserter: dest
# [B, N] (int64, each token's slot), or (dest, weight [B, N]) where a token's weight in the merge is not
# its size (0: the token is dropped, as token pruning does, rather than averaged into its slot)
Planner = Callable[["Inserter", AttentionBlock, fx.Node, fx.Node, int], "fx.Node | tuple[fx.Node, fx.Node]"]


class Inserter:
    """Appends call nodes one after another from a starting point of the graph."""

    def __init__(self, graph: Graph, after: fx.Node) -> None:
        if after.op == "placeholder":  # a block reading an input directly: what is made may read any input
            after = graph.inputs()[-1]
        self.graph, self.last = graph, after
        self.made: list[fx.Node] = []

    def __call__(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        with self.graph.fx_graph.inserting_after(self.last):
            node = self.graph.fx_graph.call_function(target, args, kwargs)
        self.last = node
        self.made.append(node)
        return node


def reroute(old: fx.Node, new: fx.Node, made: list[fx.Node]) -> None:
    """Make the readers of ``old`` read ``new``, except the nodes ``made`` to compute ``new`` and
    torch.export's input guards (a call_module), which check the input as it came."""
    made_set = set(made)
    old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in made_set and user.op != "call_module")


def replace_count(graph: Graph, users: set[fx.Node], old: Any, new: fx.Node, made_sizes: set[fx.Node]) -> None:
    """In ``users``, read the token count from ``new`` wherever they read it from ``old``.

    A symbolic count is a node: users that read it, or a size computed from it (``batch * tokens``
    for a flattened view), get it, or a copy of that computation, from ``new``. A static count is a
    number: in the size argument of a shape op, entries equal to it are replaced, and so are entries
    that multiply a size by it (``batch * 17`` for a flattened view of a fixed image's tokens). Size
    nodes made by earlier steps have no recorded value yet: ``made_sizes`` holds them, and gains the
    copies.
    """
    def is_size(node: Any) -> bool:
        value = node.meta.get("val") if isinstance(node, fx.Node) else None
        return node in made_sizes or (isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool))

    if not isinstance(old, fx.Node):
        products: dict[fx.Node, fx.Node] = {}

        def counted(entry: Any) -> Any:
            """A size list's entry with the count ``new`` where it was ``old``."""
            if _is_count(entry, old):
                return new
            if isinstance(entry, fx.Node) and entry.target == operator.mul and any(_is_count(a, old)
                                                                                  for a in entry.args):
                if entry not in products:
                    with graph.fx_graph.inserting_after(_last_of(new, set(entry.all_input_nodes))):
                        products[entry] = graph.fx_graph.call_function(
                            operator.mul, tuple(new if _is_count(a, old) else a for a in entry.args))
                    made_sizes.add(products[entry])
                return products[entry]
            return entry

        for node in users:
            if node.op == "call_function" and node.target in SHAPE_OPS:
                for position, arg in enumerate(node.args):
                    if isinstance(arg, (list, tuple)) and any(counted(a) is not a for a in arg):
                        node.update_arg(position, type(arg)(counted(a) for a in arg))
        return
    rebased: dict[fx.Node, fx.Node] = {old: new}

    def rebase(size: fx.Node) -> fx.Node:
        """``size`` computed from ``new`` instead of ``old`` (itself when it does not depend on it)."""
        if size not in rebased:
            rebased[size] = size
            if size.op == "call_function" and any(rebase(a) is not a for a in size.all_input_nodes if is_size(a)):
                args = {rebase(a) if is_size(a) else a for a in size.all_input_nodes}
                with graph.fx_graph.inserting_after(_last_of(new, args)):
                    copy = graph.fx_graph.node_copy(size, lambda a: rebase(a) if is_size(a) else a)
                rebased[size] = copy
                made_sizes.add(copy)
        return rebased[size]

    for node in users:
        if node.op == "call_function":
            for size in [a for a in node.all_input_nodes if is_size(a)]:
                if rebase(size) is not size:
                    node.replace_input_with(size, rebase(size))


def static_count_clash(graph: Graph, blocks: list[AttentionBlock]) -> str | None:
    """Why a fixed token count cannot be rewritten, or None.

    Where the count is a number in the graph (a capture with static shapes, a fixed image size), an
    entry of a size list equal to it is taken for it (see :func:`replace_count`): where the batch, the
    head count, the head dim or the channels equal the count, those would change with it. Named so that
    the pass changes nothing rather than fail. (Batch times heads is not checked: only a view folding
    the heads into the batch writes it, and refusing it would refuse, say, BERT at batch 8 with 16 heads
    and 128 tokens, which merges.)
    """
    tokens = graph.shape(blocks[0].keys)[2]
    if not isinstance(tokens, int):
        return None
    for block in blocks:
        batch, heads, _, head_dim = graph.shape(block.keys)
        channels = graph.shape(block.stream)[2]
        for what, size in (("batch size", batch), ("head count", heads), ("head dim", head_dim),
                           ("channel count", channels)):
            if isinstance(size, int) and size == tokens:
                return (f"the token count is fixed in this graph ({tokens}) and equals the {what} of attention "
                        f"'{block.attention.name}', so sizes written as numbers cannot be told apart; capture with "
                        f"dynamic shapes (the default), or at another length or image size")
    return None


def _is_count(arg: Any, count: int) -> bool:
    """Whether ``arg`` is the static token count (an int equal to it, not a bool)."""
    return isinstance(arg, int) and not isinstance(arg, bool) and arg == count


def _last_of(start: fx.Node, nodes: set[fx.Node]) -> fx.Node:
    """``start``, or the last of ``nodes`` after it in the graph: where a node reading them all can go
    (a size made from the new count and another one the graph computes later, as the batch size)."""
    last, node = start, start.next
    while node.op != "root":
        if node in nodes:
            last = node
        node = node.next
    return last


def padding_sizes(at: Inserter, padding: fx.Node) -> fx.Node:
    """Inserted with ``at``: what each token of a padding mask stands for, 1.0 (real) or 0.0 (padding)."""
    return at(aten._to_copy.default, at(aten.ne.Scalar, padding, 0), dtype=torch.float32)


def clamping_notes(counts: list[int], schedule: list[int]) -> list[str]:
    """A note for each merge that removed fewer tokens than its r: ``counts`` ends with the token
    count before the first merge and after each one (at the example size)."""
    merges = [r for r in schedule if r]
    notes = []
    for i, r in enumerate(merges):
        removed = counts[-len(merges) - 1 + i] - counts[-len(merges) + i]
        if removed < r:
            notes.append(f"merge {i + 1}: r={r} clamped to {removed} (half of the unprotected tokens at the "
                         f"example size)")
    return notes


def copy_before_reshaping(graph: Graph, node: fx.Node) -> None:
    """Make ``node``, if it reshapes a transposed tensor, read a contiguous copy of it.

    An attention that gains a mask may return another memory layout (the exporter's decomposition
    does), and with a token count only known at run time the exporter cannot tell whether a view of
    the transposed output is possible. Reshaping a transposed tensor copies it anyway, so copying
    first costs nothing more and makes the view always possible.
    """
    if node.op != "call_function" or node.target not in (aten.view.default, aten.reshape.default):
        return
    source = node.args[0]
    if isinstance(source, fx.Node) and source.target in (aten.transpose.int, aten.permute.default):
        with graph.fx_graph.inserting_before(node):
            copy = graph.fx_graph.call_function(aten.clone.default, (source,),
                                                {"memory_format": torch.contiguous_format})
        node.replace_input_with(source, copy)
        node.target = aten.reshape.default


def count_nodes(graph: Graph, tokens: Any) -> list[fx.Node]:
    """The nodes holding a symbolic token count (``sym_size`` of any input with that size)."""
    return [n for n in graph.nodes(op="call_function") if isinstance(n.meta.get("val"), torch.SymInt)
            and same_size(n.meta["val"], tokens)]


class TokenReduction:
    """Rewrites the chosen blocks of a graph, in order; see the module docstring."""

    def __init__(self, graph: Graph, prop_attn: bool, metric: str) -> None:
        self.graph, self.prop_attn, self.metric = graph, prop_attn, metric
        self.size: fx.Node | None = None
        self.source: fx.Node | None = None
        self.count: list[Any] = []  # what later nodes read the token count from
        self.steps: list[tuple[fx.Node, fx.Node]] = []  # (tokens after a step, source map after it)
        self.made_sizes: set[fx.Node] = set()  # count nodes made here (no recorded value until refreshed)

    def _start(self, at: Inserter, block: AttentionBlock, tokens_of: fx.Node) -> None:
        """The first sizes: 1 per real token, 0 for padding; and where the graph reads the count from."""
        if block.padding is not None:
            self.size = padding_sizes(at, block.padding)
        else:
            self.size = at(aten.ones_like.default, at(aten.select.int, tokens_of, 2, 0), dtype=torch.float32)
        tokens = self.graph.shape(tokens_of)[1]
        self.count = count_nodes(self.graph, tokens) if isinstance(tokens, torch.SymInt) else [int(tokens)]

    def drop_padding(self, block: AttentionBlock) -> None:
        """Before ``block`` (the first one), move real tokens to the front and cut the batch to its
        longest row (``bevel::drop_padding``), so padding no row needs is never computed."""
        at = Inserter(self.graph, block.input)
        self._start(at, block, block.input)
        dropped = at(bevel_ops.drop_padding.default, block.input, self.size)
        x, size, dest = (at(operator.getitem, dropped, i) for i in range(3))
        self._follow(at, block.input, x, size, dest)

    def reduce(self, block: AttentionBlock, r: int, protect: int, planner: Planner) -> None:
        """Reduce the tokens of ``block``'s stream by ``r`` (clamped at run time, see token_merge)."""
        stream = block.stream
        at = Inserter(self.graph, stream)
        if self.size is None:
            self._start(at, block, stream)
        metric = at(aten.mean.dim, block.keys, [1]) if self.metric == "keys" else stream
        plan = planner(at, block, metric, self.size, r)
        dest, weight = plan if isinstance(plan, tuple) else (plan, self.size)
        merged = at(bevel_ops.merge_tokens.default, stream, weight, dest, r, protect)
        x, size = at(operator.getitem, merged, 0), at(operator.getitem, merged, 1)
        self._follow(at, stream, x, size, dest)

    def _follow(self, at: Inserter, old: fx.Node, x: fx.Node, size: fx.Node, dest: fx.Node) -> None:
        """Make the graph after ``old`` read the reduced tokens ``x``: their count, their sizes in the
        attention masks, and the source map for unmerging."""
        graph = self.graph
        source = dest if self.source is None else at(aten.gather.default, dest, 1, self.source)
        count = at(aten.sym_size.int, x, 1)
        self.made_sizes.add(count)
        reroute(old, x, at.made)
        later = descendants(x)
        for node in later:
            copy_before_reshaping(graph, node)
        for old_count in self.count:
            replace_count(graph, later, old_count, count, self.made_sizes)
        mask = None
        for node in sorted((n for n in later if n.target in ATTENTION_OPS), key=_order(graph)):
            if mask is None:
                mask = self._mask(Inserter(graph, count), size, node)
            found = find_argument(node, "attn_mask")
            set_argument(node, found[0] if found is not None else "attn_mask", mask)
        self.size, self.source, self.count = size, source, [count]
        self.steps.append((x, source))

    def _mask(self, at: Inserter, size: fx.Node, attention: fx.Node) -> fx.Node:
        """The additive mask [B, 1, 1, N] of the attentions after a merge: log(size), or with
        ``prop_attn`` off only 0 for real tokens and -inf for padding."""
        weight = size if self.prop_attn else at(aten.clamp_max.default, size, 1.0)
        mask = at(aten.unsqueeze.default, at(aten.unsqueeze.default, at(aten.log.default, weight), 1), 1)
        dtype = self.graph.dtype(attention.args[0])
        return mask if dtype in (None, torch.float32) else at(aten._to_copy.default, mask, dtype=dtype)

    def per_token_outputs(self, tokens: Any) -> list[tuple[int, fx.Node, fx.Node]]:
        """The outputs that were [B, ``tokens``, C] (per-token at the original count; shapes are read
        before the graph is refreshed) and now come after a reduction: (flat position, node, the
        source map of the last reduction before it)."""
        output = next(iter(self.graph.nodes(op="output")))
        after = [(descendants(x) | {x}, source) for x, source in reversed(self.steps)]
        found = []
        for i, value in enumerate(output.args[0]):
            shape = self.graph.shape(value) if isinstance(value, fx.Node) else None
            if shape is None or len(shape) != 3 or not same_size(shape[1], tokens):
                continue
            source = next((source for later, source in after if value in later), None)
            if source is not None:
                found.append((i, value, source))
        return found

    def unmerge_outputs(self, tokens: Any) -> list[str]:
        """Spread the per-token outputs (see :meth:`per_token_outputs`) back to the original tokens;
        returns their names."""
        output = next(iter(self.graph.nodes(op="output")))
        values = list(output.args[0])
        spread = []
        for i, value, source in self.per_token_outputs(tokens):
            with self.graph.fx_graph.inserting_before(output):
                values[i] = self.graph.fx_graph.call_function(bevel_ops.unmerge_tokens.default, (value, source))
            spread.append(value.name)
        output.update_arg(0, type(output.args[0])(values))
        return spread


def _order(graph: Graph) -> Callable[[fx.Node], int]:
    positions = {node: i for i, node in enumerate(graph.fx_graph.nodes)}
    return lambda node: positions[node]
