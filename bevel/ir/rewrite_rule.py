"""Pattern rewrites: a rule is a traced example function (``pattern``), a guard on each match
(``check``) and a traced replacement (``rewrite``); :meth:`RewriteRule.explain` says, node by node,
which part of the pattern failed where a rule did not match.

The pattern is written with the graph's own ops (``torch.ops.aten.linear.default(x, w, b)``) and
traced once by torch.fx. It matches a graph node when the node calls the pattern's last op and,
argument by argument, every op of the pattern lines up with the graph; each argument of the pattern
function binds to whatever stands in its place (a node, a number, or the op's default where the graph
leaves an optional trailing argument out: None for a Linear without bias), an argument used twice
must bind the same thing twice (the same node, or equal literals), and an op the pattern uses twice
must be one node of the graph. A match that passes ``check`` can be replaced: ``rewrite`` is called
with proxies of the bound nodes, so the ops it calls are recorded into the graph in the matched
node's place.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from bevel.ir.arguments import positional_default
from bevel.ir.graph import Graph
from bevel.ir.printer import target_text


@dataclass
class Match:
    """One place a rule's pattern matched: the graph node of the pattern's output (``anchor``) and what
    each argument of the pattern function bound to."""

    graph: Graph
    anchor: fx.Node
    bound: dict[str, Any]
    reason: str | None = field(default=None, repr=False)  # why ``check`` refused it, for explain
    tracer: fx.proxy.GraphAppendingTracer | None = field(default=None, repr=False)  # set while rewriting

    def node(self, name: str) -> Any:
        """What the pattern argument ``name`` bound to: a node, a number, or None."""
        return self.bound[name]

    def __getitem__(self, name: str) -> Any:
        """The tensor stored behind ``name`` if it is a weight or buffer, else what it bound to."""
        value = self.bound[name]
        return self.graph.param(value.target) if self.graph.is_tensor_attr(value) else value

    def is_param(self, name: str) -> bool:
        """Whether ``name`` bound to a stored ``nn.Parameter`` (a weight, not an activation or buffer)."""
        return self.graph.is_parameter(self.bound[name])

    def reject(self, reason: str) -> bool:
        """Refuse this match with a sentence on why (shown by explain); returns False for ``check``."""
        self.reason = reason
        return False

    def new_param(self, name: str, value: torch.Tensor) -> Any:
        """Store ``value`` under a fresh name derived from ``name``; a get_attr node before the anchor
        (inside ``rewrite``, a proxy of it, to compute with)."""
        node = self.graph.add_param(name, value, before=self.anchor)
        return node if self.tracer is None else fx.Proxy(node, self.tracer)


@dataclass
class Explanation:
    """What a rule made of one graph node that calls its pattern's last op."""

    node: str
    matched: bool
    reason: str  # "matched", or which part of the pattern failed on which node


class RewriteRule:
    """A pattern rewrite. Subclasses define ``pattern`` (and ``rewrite`` to be applied) and may guard
    with ``check``; ``name`` is how ``bevel inspect --explain`` refers to a registered rule."""

    name: str = ""
    pattern: Callable[..., Any]

    @classmethod
    def for_graph(cls, graph: Graph) -> "RewriteRule":
        """The rule with its default settings for ``graph`` (what ``--explain`` runs)."""
        return cls()

    def check(self, m: Match) -> bool:
        """Whether this match may be rewritten (cheap guards; call ``m.reject(why)`` to say why not)."""
        return True

    def rewrite(self, m: Match, *args: Any) -> Any:
        """The replacement, written with ops on ``args`` (proxies of the bound nodes, in pattern order)."""
        raise NotImplementedError(f"rule {self.name or type(self).__name__} defines no rewrite")

    # -- matching --------------------------------------------------------------------------------

    def pattern_graph(self) -> fx.Graph:
        """The pattern traced by torch.fx (once per rule class)."""
        cls = type(self)
        if "_traced" not in cls.__dict__:
            traced = fx.Graph()
            tracer = fx.proxy.GraphAppendingTracer(traced)
            names = list(inspect.signature(self.pattern).parameters)
            result = self.pattern(*(fx.Proxy(traced.placeholder(name), tracer) for name in names))
            if not isinstance(result, fx.Proxy) or result.node.op != "call_function":
                raise TypeError(f"rule {cls.__name__}: a pattern must return the result of an op call")
            traced.output(result.node)
            cls._traced = traced
        return cls._traced

    def _anchor(self) -> fx.Node:
        return next(n for n in self.pattern_graph().nodes if n.op == "output").args[0]

    @property
    def target(self) -> Any:
        """The op the pattern ends with: only nodes calling it can match."""
        return self._anchor().target

    def _arguments(self) -> list[str]:
        return [n.target for n in self.pattern_graph().nodes if n.op == "placeholder"]

    def match_at(self, graph: Graph, node: fx.Node) -> Match | str:
        """The match rooted at ``node``, or a sentence on which part of the pattern failed where."""
        bound: dict[str, Any] = {}
        failure = _match(self._anchor(), node, bound, {})
        if failure is not None:
            return failure
        return Match(graph, node, {name: bound.get(name) for name in self._arguments()})

    def checked_at(self, graph: Graph, node: fx.Node) -> Match | str:
        """The match rooted at ``node`` if it passes ``check``, else why not: which part of the pattern
        failed where, or ``check refused: <its reason>``."""
        m = self.match_at(graph, node)
        if isinstance(m, str) or self.check(m):
            return m
        return f"check refused: {m.reason or 'no reason given'}"

    def matches(self, graph: Graph) -> list[Match]:
        """Every match in graph order that passes ``check``."""
        found = (self.checked_at(graph, node) for node in graph.nodes(op="call_function", target=self.target))
        return [m for m in found if isinstance(m, Match)]

    def explain(self, graph: Graph) -> list[Explanation]:
        """For each node calling the pattern's last op: matched, or why not (the pattern part, the node,
        or the reason ``check`` gave)."""
        found = []
        for node in graph.nodes(op="call_function", target=self.target):
            m = self.checked_at(graph, node)
            found.append(Explanation(node.name, True, "matched") if isinstance(m, Match)
                         else Explanation(node.name, False, m))
        return found

    # -- rewriting -------------------------------------------------------------------------------

    def replace(self, m: Match) -> Any:
        """Record ``rewrite`` in the anchor's place and send the anchor's users to its result."""
        m.tracer = fx.proxy.GraphAppendingTracer(m.graph.fx_graph)
        args = [fx.Proxy(v, m.tracer) if isinstance(v, fx.Node) else v for v in m.bound.values()]
        before = m.anchor.prev  # the rewrite's nodes go between it and the anchor
        try:
            with m.graph.fx_graph.inserting_before(m.anchor):
                result = self.rewrite(m, *args)
        finally:
            m.tracer = None
        new = result.node if isinstance(result, fx.Proxy) else result
        # the nodes the rewrite made stand where the anchor stood (the block analyses read that); a node it
        # returned unchanged (an input of the pattern) keeps its own place
        place = {k: v for k, v in m.anchor.meta.items() if k in ("nn_module_stack", "stack_trace")}
        made = before.next
        while made is not m.anchor:
            if made.op == "call_function":
                made.meta.update(place)
            made = made.next
        m.graph.replace_node(m.anchor, new)
        return new

    def apply(self, graph: Graph) -> int:
        """Rewrite every match; returns how many. Call ``graph.refresh()`` after the last rule."""
        count = 0
        # matched one node at a time, each after the replacements before it: a match binding an earlier
        # match's anchor (chained patterns) binds its replacement. The nodes a rewrite adds are not visited.
        for node in graph.nodes(op="call_function", target=self.target):
            m = self.checked_at(graph, node)
            if isinstance(m, Match):
                self.replace(m)
                count += 1
        return count


RULES: dict[str, type[RewriteRule]] = {}


def register_rule(cls: type[RewriteRule]) -> type[RewriteRule]:
    """Class decorator: make a rule known to ``bevel inspect --explain`` by its ``name``."""
    if not cls.name or RULES.get(cls.name, cls) is not cls:
        raise ValueError(f"rule {cls.__name__}: a registered rule needs a name of its own, got {cls.name!r}")
    RULES[cls.name] = cls
    return cls


def describe(value: Any) -> str:
    """A graph value in a sentence: a node's name and op, or a literal's repr."""
    if isinstance(value, fx.Node):
        return f"'{value.name}' ({target_text(value.target) if value.op == 'call_function' else value.op})"
    return repr(value)


def _same(a: Any, b: Any) -> bool:
    """Whether two bound values are the same: one node, or equal literals of one type."""
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return a is b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _match(pattern: Any, value: Any, bound: dict[str, Any], seen: dict[fx.Node, fx.Node]) -> str | None:
    """Match the pattern node or literal ``pattern`` against the graph's ``value``; None if they match,
    else the reason. ``bound`` collects what the pattern's arguments stand for, ``seen`` the graph node
    each op of the pattern matched."""
    if isinstance(pattern, fx.Node) and pattern.op == "placeholder":
        if pattern.target in bound and not _same(bound[pattern.target], value):
            return (f"argument {pattern.target} is {describe(bound[pattern.target])} in one place and "
                    f"{describe(value)} in another")
        bound[pattern.target] = value
        return None
    if isinstance(pattern, fx.Node):  # an op of the pattern
        wanted = target_text(pattern.target)
        if pattern in seen:  # an op the pattern uses twice is one node
            if seen[pattern] is value:
                return None
            return f"the pattern's {wanted} is {describe(seen[pattern])} in one place and {describe(value)} in another"
        if not (isinstance(value, fx.Node) and value.op == "call_function" and value.target == pattern.target):
            return f"{wanted} expected, found {describe(value)}"
        if set(value.kwargs) != set(pattern.kwargs):
            return (f"{describe(value)} has keyword arguments {sorted(value.kwargs)}, the pattern's {wanted} "
                    f"{sorted(pattern.kwargs)}")
        if len(value.args) > len(pattern.args):
            return f"{describe(value)} has {len(value.args)} arguments, the pattern's {wanted} {len(pattern.args)}"
        for i, part in enumerate(pattern.args):
            if i >= len(value.args):
                if isinstance(part, fx.Node) and part.op == "placeholder":
                    # an optional trailing argument the graph leaves out stands for the op's default
                    failure = _match(part, positional_default(value.target, i), bound, seen)
                    if failure is None:
                        continue
                return f"{describe(value)} has {len(value.args)} arguments, the pattern's {wanted} {len(pattern.args)}"
            failure = _match(part, value.args[i], bound, seen)
            if failure is not None:
                return failure if isinstance(part, fx.Node) else f"argument {i} of {describe(value)}: {failure}"
        for key, part in pattern.kwargs.items():
            failure = _match(part, value.kwargs[key], bound, seen)
            if failure is not None:
                return failure
        seen[pattern] = value
        return None
    if isinstance(pattern, (list, tuple)):
        if not isinstance(value, (list, tuple)) or len(value) != len(pattern):
            return f"{pattern!r} expected, found {describe(value)}"
        for p, v in zip(pattern, value):
            failure = _match(p, v, bound, seen)
            if failure is not None:
                return failure
        return None
    if pattern != value or type(pattern) is not type(value):
        return f"{pattern!r} expected, found {describe(value)}"
    return None
