"""Running an early-exit graph (``layer_skip.early_exit``) so that exited rows skip the blocks after
their exit, with the same outputs as the graph.

The graph computes every block for every row and keeps exited tokens' hidden states with
``bevel::early_exit_freeze``. :class:`EarlyExitRunner` cuts a flat runtime graph (see
:func:`bevel.runtime.compiled_decoder.runtime_graph`) into stages at those ops: the prefix (the
embedding and the blocks up to the first exit), one stage per later block (the block, its freeze,
its exit head and decision), and the suffix (the final norm and head). Before each block stage it
looks at the exit depths: the rows with a token still running go through the stage, gathered into a
smaller batch when at most ``compact_share`` of the batch still runs (compaction; otherwise the
whole batch runs the block and the freeze keeps the exited tokens); the rows whose tokens have all
exited, when they are left out, only get the
keys and values the block would write for them, computed from their frozen hidden state by the
stage's cache-writing nodes alone (with ``mode="skipdecode"`` not even that: later positions never
read them). A stage none of whose rows runs is not called at all.

With ``mode="skipdecode"`` the decode loop also carries the last position's exit depth from step to
step (state of the loop, like the cache's fill level) so that depths never rise along the sequence;
within one step the graph's own running maximum does that. Graphs whose blocks hand anything else
to later stages, or whose batch size is fixed, run whole: same outputs, no skipping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from bevel.runtime.early_exit_ops import decide_reference, freeze_reference

DECIDE = torch.ops.bevel.early_exit_decide.default
FREEZE = torch.ops.bevel.early_exit_freeze.default
_CACHE_WRITE = torch.ops.aten.index_copy_.default
# the pieces call the ops' references directly: the same code, without the dispatcher's cost per call
_DIRECT = {DECIDE: decide_reference, FREEZE: freeze_reference}


def has_early_exit(module: fx.GraphModule) -> bool:
    """Whether ``module`` holds ``layer_skip.early_exit``'s decisions."""
    return any(n.target == DECIDE for n in module.graph.nodes)


@dataclass
class EarlyExitState:
    """What the runners of one compiled model share (a decoder's prefill and decode graphs): the
    depth statistics of the tokens or samples they ran, when to gather rows, and SkipDecode's bound
    carried between decode steps."""

    total: int
    shared: bool
    cap: int | None = None                 # exit depth of the last position run (skipdecode only)
    compact_share: float = 0.5             # gather the running rows when at most this share of the batch runs
    compacted: int = 0                     # block runs on a gathered part of the batch since the last reset
    counts: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    decode_counts: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))

    @property
    def tokens(self) -> int:
        """Real tokens run since the last :meth:`reset` (padding excluded)."""
        return int(self.counts.sum())

    @property
    def average_depth(self) -> float | None:
        """Mean number of blocks those tokens ran (None before any)."""
        return self.average() if self.tokens else None

    def average(self, decode_only: bool = False) -> float:
        """Mean number of blocks the counted tokens ran, or only those of decode steps (one token per
        sequence each); the full depth when there were none."""
        counts = self.decode_counts if decode_only else self.counts
        if not int(counts.sum()):
            return float(self.total)
        depths = torch.arange(counts.numel(), dtype=torch.float64)
        return float((counts.double() * depths).sum() / counts.sum())

    def depth_counts(self) -> dict[int, int]:
        """How many tokens left at each depth."""
        return {depth: int(c) for depth, c in enumerate(self.counts.tolist()) if c}

    def reset(self) -> None:
        """Forget the counted tokens."""
        self.counts = torch.zeros(self.total + 1, dtype=torch.int64)
        self.decode_counts = self.counts.clone()
        self.compacted = 0

    def record(self, depth: torch.Tensor, real: torch.Tensor | None, decode: bool) -> None:
        """Count the exit depths of a step's tokens (only the ``real`` ones when given)."""
        chosen = depth[real] if real is not None else depth.reshape(-1)
        found = torch.bincount(chosen.reshape(-1).cpu(), minlength=self.total + 1)
        self.counts = self.counts + found
        if decode:
            self.decode_counts = self.decode_counts + found


def early_exit_state(module: fx.GraphModule) -> EarlyExitState:
    """The shared state of the runners of an early-exit graph, read from its decisions."""
    decides = [n for n in module.graph.nodes if n.target == DECIDE]
    freezes = [n for n in module.graph.nodes if n.target == FREEZE]
    total = max(n.args[3] for n in freezes) + 1  # the last block always has a freeze
    state = EarlyExitState(total=total, shared=bool(decides[0].args[5]))
    state.reset()
    return state


@dataclass
class _Write:
    """A cache write ``cache.index_copy_(dim, slots, source)`` of a block stage."""

    cache: fx.Node
    dim: int
    slots: fx.Node
    source: fx.Node


@dataclass
class _Piece:
    """Nodes of the graph copied into a module of their own: ``module(*values of inputs)`` returns the
    values of ``outputs``; ``rows[i]`` says whether input ``i`` has the batch as its first dimension."""

    module: fx.GraphModule
    inputs: list[fx.Node]
    outputs: list[fx.Node]
    rows: list[bool]

    def __call__(self, env: dict[fx.Node, Any], select: torch.Tensor | None = None,
                 gathered: dict[fx.Node, torch.Tensor] | None = None) -> tuple[Any, ...]:
        """Run on the values in ``env``; with ``select``, on those rows only (inputs already in
        ``gathered`` are taken from there as they are)."""
        gathered = gathered or {}
        values = [gathered[n] if n in gathered else
                  env[n].index_select(0, select) if select is not None and by_row else env[n]
                  for n, by_row in zip(self.inputs, self.rows)]
        return self.module.forward(*values)  # forward itself: a module call's hooks cost time per block


@dataclass
class _Stage:
    """One block after the first exit point: its full piece and the piece computing its cache writes."""

    block: int
    exit_depth: int | None     # the depth a token leaving after this block gets (None: the last block)
    full: _Piece
    kv: _Piece
    stream_in: fx.Node
    stream_out: fx.Node
    depth_in: fx.Node
    depth_out: fx.Node
    writes: list[_Write]


class EarlyExitRunner(torch.nn.Module):
    """Runs a flat early-exit step graph stage by stage (see the module docstring); called like the
    graph, with the same outputs."""

    def __init__(self, module: fx.GraphModule, state: EarlyExitState, decode: bool) -> None:
        super().__init__()
        self.module = module
        self.state = state
        self.decode = decode  # carries SkipDecode's bound from the previous step
        self.placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
        (self.output,) = [n for n in module.graph.nodes if n.op == "output"]
        self.names = [n.name for n in self.placeholders]
        self.whole = False
        try:
            self._split()
        except _CannotSplit:
            self.whole = True  # same outputs from the graph itself, without skipping

    # -- building ------------------------------------------------------------------------------

    def _split(self) -> None:
        from bevel.passes.cleanup import is_alias_of_input

        graph = self.module.graph
        # a re-traced graph (a loaded artifact) reads the hidden state through no-op casts that sit
        # inside the next block; reading the tensor itself keeps each block's inputs outside it
        for node in list(graph.nodes):
            if is_alias_of_input(node):
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
        self.module.recompile()
        decides = {n.args[3]: n for n in graph.nodes if n.target == DECIDE}
        freezes = {n.args[3]: n for n in graph.nodes if n.target == FREEZE}
        first = min(decides) - 1  # the block after which the first exit happens
        markers = [decides[first + 1]] + [decides.get(b + 1, freezes[b]) for b in sorted(freezes)]
        stage_of: dict[fx.Node, int] = {}
        for index, marker in enumerate(markers):
            stack = [marker]
            while stack:
                node = stack.pop()
                if node in stage_of or node.op in ("placeholder", "get_attr"):
                    continue
                stage_of[node] = index
                stack.extend(node.all_input_nodes)
        order = [n for n in graph.nodes if n.op == "call_function"]
        for node in order:
            stage_of.setdefault(node, len(markers))  # the suffix: final norm and head
        members = [[n for n in order if stage_of[n] == s] for s in range(len(markers) + 1)]
        writes = {n for n in order if n.target == _CACHE_WRITE}
        leaving = [self._leaving(nodes, stage_of, s, writes) for s, nodes in enumerate(members)]
        batch = _batch_symbol(self.placeholders)
        if batch is None:
            raise _CannotSplit("the batch size is fixed")
        self.prefix = _extract(self.module, members[0], leaving[0], batch)
        self.suffix = _extract(self.module, members[-1], self._outputs(writes), batch)
        self.stages = []
        for s, block in enumerate(sorted(freezes), start=1):
            freeze = freezes[block]
            decide = decides.get(block + 1)
            stream_in, depth_in = freeze.args[0], freeze.args[2]
            expected = {freeze} | ({decide} if decide is not None else set())
            if set(leaving[s]) - expected:
                raise _CannotSplit(f"block {block} hands other values to later blocks")
            stage_writes = [_Write(w.args[0], w.args[1], w.args[2], w.args[3]) for w in members[s] if w in writes]
            if any(w.cache.op != "placeholder" for w in stage_writes):
                raise _CannotSplit(f"block {block} writes a cache that is not an input")
            sources = [w.source for w in stage_writes]
            needed = _ancestors_within(sources, set(members[s]))
            self.stages.append(_Stage(
                block=block, exit_depth=None if decide is None else block + 1,
                full=_extract(self.module, members[s], [freeze] + ([decide] if decide is not None else []), batch),
                kv=_extract(self.module, [n for n in members[s] if n in needed], sources, batch),
                stream_in=stream_in, stream_out=freeze, depth_in=depth_in,
                depth_out=decide if decide is not None else depth_in, writes=stage_writes))
        self.first_depth = decides[first + 1]
        self.last_depth = self.stages[-1].depth_out if self.stages else self.first_depth

    def _leaving(self, nodes: list[fx.Node], stage_of: dict[fx.Node, int], stage: int,
                 writes: set[fx.Node]) -> list[fx.Node]:
        """The nodes of a stage that later stages read; cache writes are read through their cache."""
        return [n for n in nodes if n not in writes
                and any(u.op == "output" or stage_of.get(u, -1) > stage for u in n.users)]

    def _outputs(self, writes: set[fx.Node]) -> list[fx.Node]:
        flat = self.output.args[0]
        values = list(flat) if isinstance(flat, (tuple, list)) else [flat]
        if any(v in writes and v.args[0].op != "placeholder" for v in values):
            raise _CannotSplit("an output is a write into a cache that is not an input")
        return [v for v in values if v not in writes]

    # -- running -------------------------------------------------------------------------------

    def forward(self, *inputs: torch.Tensor) -> Any:
        """The graph's outputs for ``inputs``, skipping what exited rows do not need."""
        if self.whole:
            result = self.module(*inputs)
            self._record(self._depth_of_whole(inputs), inputs)
            return result
        env: dict[fx.Node, Any] = dict(zip(self.placeholders, inputs))
        env.update(zip(self.prefix.outputs, self.prefix(env)))
        cap = self.state.cap if (self.state.shared and self.decode) else None
        self._bound(env, self.first_depth, self.first_depth.args[3], cap)
        for stage in self.stages:
            self._run_stage(stage, env)
            if stage.exit_depth is not None:
                self._bound(env, stage.depth_out, stage.exit_depth, cap)
        env.update(zip(self.suffix.outputs, self.suffix(env)))
        depth = env[self.last_depth]
        if self.state.shared:
            self.state.cap = int(depth.reshape(depth.shape[0], -1)[0, -1])
        self._record(depth, inputs)
        flat = self.output.args[0]
        values = list(flat) if isinstance(flat, (tuple, list)) else [flat]
        results = tuple(env[v.args[0]] if v.target == _CACHE_WRITE else env[v] for v in values)
        return results if isinstance(flat, (tuple, list)) else results[0]

    @staticmethod
    def _bound(env: dict[fx.Node, Any], node: fx.Node, exit_depth: int, cap: int | None) -> None:
        """SkipDecode: tokens still running when the previous position's depth is reached exit there."""
        if cap is not None and exit_depth >= cap:
            env[node] = env[node].clamp(max=cap)

    def _run_stage(self, stage: _Stage, env: dict[fx.Node, Any]) -> None:
        depth = env[stage.depth_in]
        # one small read per block decides what runs; the rest stays in tensors
        deepest = depth.reshape(depth.shape[0], -1).amax(dim=1).tolist()
        running = [row for row, value in enumerate(deepest) if value > stage.block]
        count = len(running)
        outputs = [stage.stream_out] + ([stage.depth_out] if stage.exit_depth is not None else [])
        if count == depth.shape[0] or (count and count > self.state.compact_share * depth.shape[0]):
            # every row runs the block, or too many for gathering them to pay: the whole batch runs
            # it, and the freeze keeps the exited tokens' hidden states (their cache entries come
            # from those, as the graph computes them)
            env.update(zip(outputs, stage.full(env)))
            return
        env[stage.stream_out] = env[stage.stream_in]
        env[stage.depth_out] = depth
        if count:
            rows = torch.tensor(running, device=depth.device)
            self.state.compacted += 1
            gathered = {w.cache: env[w.cache].index_select(0, rows) for w in stage.writes}
            results = stage.full(env, rows, gathered)
            for node, value in zip(outputs, results):
                env[node] = env[node].index_copy(0, rows, value)
            for w in stage.writes:  # the stage wrote into the gathered copies: put its slots back
                slots = env[w.slots]
                _write_rows(env[w.cache], w.dim, slots, gathered[w.cache].index_select(w.dim, slots), rows)
        if self.state.shared:
            return  # later positions exit no deeper: nothing will read the skipped layers' entries
        rest = torch.tensor([row for row, value in enumerate(deepest) if value <= stage.block], device=depth.device)
        if not stage.writes:
            return  # no cache (an encoder or a classifier): exited rows need nothing from this block
        sources = stage.kv(env, None if count == 0 else rest)
        for w, source in zip(stage.writes, sources):
            if count == 0:
                env[w.cache].index_copy_(w.dim, env[w.slots], source)
            else:
                _write_rows(env[w.cache], w.dim, env[w.slots], source, rest)

    def _record(self, depth: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> None:
        from bevel.passes.token_rows import token_mask

        real = None
        if "kv_positions" in self.names and "cache_position" in self.names and depth.dim() == 2:
            # a decoder step: padding slots hold position -1
            positions = inputs[self.names.index("kv_positions")]
            real = positions.index_select(1, inputs[self.names.index("cache_position")]) >= 0
        elif depth.dim() == 2:  # an encoder's tokens: those its attention mask marks
            mask = token_mask(inputs)
            real = mask if mask is not None and mask.shape == depth.shape else None
        self.state.record(depth, real, self.decode)

    def _depth_of_whole(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        from bevel.passes.layer_skip.early_exit import exit_depths

        return exit_depths(self.module, inputs)  # a second run, only for graphs that cannot be split


class _CannotSplit(Exception):
    """The graph cannot be run stage by stage; it runs whole."""


def _write_rows(cache: torch.Tensor, dim: int, slots: torch.Tensor, source: torch.Tensor, rows: torch.Tensor) -> None:
    """``cache[rows].index_copy_(dim, slots, source)``, in place in ``cache`` (only those rows)."""
    index: list[Any] = [slice(None)] * cache.dim()
    index[0], index[dim] = rows.view(-1, 1), slots.view(1, -1)
    # the two index tensors broadcast to [rows, slots], which advanced indexing puts first
    cache[tuple(index)] = source.movedim(dim, 1)


def _ancestors_within(nodes: list[fx.Node], allowed: set[fx.Node]) -> set[fx.Node]:
    found, stack = set(), list(nodes)
    while stack:
        node = stack.pop()
        if node in found or node not in allowed:
            continue
        found.add(node)
        stack.extend(node.all_input_nodes)
    return found


def _symbol(size: Any) -> str | None:
    """The name of a plain symbolic size (``s10``), else None."""
    if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
        return str(size.node.expr)
    return None


def _batch_symbol(placeholders: list[fx.Node]) -> str | None:
    """The symbol of the batch size: the first dimension of the first tensor input."""
    for node in placeholders:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return _symbol(value.shape[0])
    return None


def _extract(module: fx.GraphModule, nodes: list[fx.Node], outputs: list[fx.Node], batch: str) -> _Piece:
    """``nodes`` (in graph order) copied into a module of their own that shares ``module``'s weights.

    A size read from outside (``sym_size``) is taken again from one of the piece's own tensor inputs
    with that size, so that a piece run on fewer rows sees its own batch size; a batch size that
    cannot be taken so makes the graph run whole.
    """
    inside = set(nodes)
    external: list[fx.Node] = []
    # what the nodes read from outside, and outputs computed before the piece (passed through)
    for source in [a for node in nodes for a in node.all_input_nodes] + outputs:
        if source not in inside and source.op != "get_attr" and source not in external:
            external.append(source)
    tensors = [n for n in external if not _is_size(n)]
    sizes = {n: _size_source(n, tensors, batch) for n in external if _is_size(n)}
    inputs = tensors + [n for n, source in sizes.items() if source is None]
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in inputs:
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)
    for node, source in sizes.items():
        if source is not None:
            env[node] = graph.call_function(torch.ops.aten.sym_size.int, (env[source[0]], source[1]))
            env[node].meta = dict(node.meta)
    for node in nodes:
        def arg(a: fx.Node) -> fx.Node:
            if a not in env:  # a weight
                env[a] = graph.get_attr(a.target)
                env[a].meta = dict(a.meta)
            return env[a]

        env[node] = graph.node_copy(node, arg)
        env[node].target = _DIRECT.get(node.target, node.target)
    graph.output(tuple(env[n] for n in outputs))
    graph._codegen = fx.graph.CodeGen()
    rows = [_by_row(n, batch) for n in inputs]
    return _Piece(fx.GraphModule(module, graph), inputs, outputs, rows)


def _is_size(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), (torch.SymInt, int)) and not isinstance(node.meta.get("val"), bool)


def _size_source(node: fx.Node, tensors: list[fx.Node], batch: str) -> tuple[fx.Node, int] | None:
    """A tensor input and dimension to read ``node``'s size from again inside a piece; None for a
    size the batch does not change (passed as it is)."""
    name = _symbol(node.meta["val"])
    for source in tensors:
        value = source.meta.get("val")
        if name is not None and isinstance(value, torch.Tensor):
            for dim, size in enumerate(value.shape):
                if _symbol(size) == name:
                    return source, dim
    value = node.meta["val"]
    if isinstance(value, torch.SymInt) and batch in {str(s) for s in value.node.expr.free_symbols}:
        raise _CannotSplit(f"the size {node.name} depends on the batch and cannot be read again in a block")
    return None


def _by_row(node: fx.Node, batch: str) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dim() >= 1 and _symbol(value.shape[0]) == batch
