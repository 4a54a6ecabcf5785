"""Dynamo's FX graph as a module that owns the model's weights, so ``bevel.compile`` can capture it.

Dynamo hands a backend one FX graph per captured region. Its inputs mix three kinds of values: the
user's inputs, the model's weights (lifted as inputs, or held as attributes of the graph) and sizes
(``s0``, or ``x.size()[0]``) that dynamo passes separately. :class:`WrappedGraph` sorts them:
weights move into a :class:`DynamoGraph` under the model's own dotted names (``fc1.weight``, so
pipeline ``skip`` patterns and reports name them as the user does), sizes are read back from the
user's tensors, and only the user's inputs remain as the module's inputs. With ``dynamic=True``
dynamo also passes the model's plain numbers (a LayerNorm's eps) as 0-dim tensors: those are baked
into the graph as numbers, read once as the weights are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from bevel.errors import BevelError
from bevel.ir.attributes import get_tensor, set_tensor


@dataclass
class Slot:
    """How to fill one input of dynamo's graph from the user's inputs.

    ``kind`` is "user" (the user's input number ``index``), "weight" (the wrapper's tensor at
    ``name``), "size" (``user_inputs[index].shape[dim]``) or "stride" (``user_inputs[index].stride(dim)``).
    """

    kind: str
    index: int = -1
    name: str = ""
    dim: int = -1


class DynamoGraph(torch.nn.Module):
    """Dynamo's graph as an ordinary module: it owns the weights under dotted names and is called
    with the user's inputs only, rebuilding the graph's full argument list from them."""

    def __init__(self, graph_module: fx.GraphModule, slots: list[Slot]) -> None:
        super().__init__()
        self.dynamo_graph = graph_module
        self.slots = slots

    def forward(self, *inputs: Any) -> Any:
        args = []
        for slot in self.slots:
            if slot.kind == "user":
                args.append(inputs[slot.index])
            elif slot.kind == "weight":
                args.append(get_tensor(self, slot.name))
            elif slot.kind == "size":
                args.append(inputs[slot.index].shape[slot.dim])
            else:
                args.append(inputs[slot.index].stride(slot.dim))
        return self.dynamo_graph(*args)


class WrappedGraph:
    """One dynamo graph sorted into a :class:`DynamoGraph` (``module``) and the user's inputs.

    ``user_positions[i]`` is where the user's input ``i`` sits in dynamo's input list;
    ``user_examples`` are dynamo's example values for them. Raises BevelError when a weight reached
    the backend without its values (a fake tensor) or the example inputs do not match the graph.
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> None:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(example_inputs):
            raise BevelError(f"dynamo gave {len(example_inputs)} example inputs for a graph with "
                             f"{len(placeholders)} inputs; the bevel backend cannot match them")
        self.compile_id = str(getattr(gm, "meta", {}).get("dynamo_compile_id", "")) or None
        graph_module, lifted = lift_attributes(gm)
        copies = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
        self.module = DynamoGraph(graph_module, [])
        self.user_positions: list[int] = []
        self.user_examples: list[Any] = []
        self.user_fakes: list[Any] = []  # dynamo's fake tensor of each user input (symbolic sizes)
        self.user_sources: dict[str, int] = {}
        sizes = []
        for position, (node, value) in enumerate(zip(placeholders, example_inputs)):
            source = _source_name(node)
            if is_model_number(value, source) and bake_number(copies[position], value.item()):
                continue  # no longer an input of the graph
            if is_weight(node, value, source):
                name = self._attach(weight_name(source, node.name), value, source)
                self.module.slots.append(Slot("weight", name=name))
            elif isinstance(value, torch.SymInt) or (isinstance(value, int) and _PROPERTY.match(source or "")):
                self.module.slots.append(Slot("size"))  # filled below, once every user input is known
                sizes.append((len(self.module.slots) - 1, position, node, value, source))
            else:
                self.module.slots.append(self._add_user(position, node, value, source))
        for slot_index, position, node, value, source in sizes:
            located = self._locate_size(node, source)
            # A size that no user tensor has is a Python int the model takes: it is passed through.
            self.module.slots[slot_index] = located or self._add_user(position, node, value, source)
        for fqn, value in lifted:
            self.module.slots.append(Slot("weight", name=self._attach(fqn, value, None)))
        graph_module.recompile()

    def dynamic_shapes(self) -> Any:
        """torch.export dynamic_shapes for the user inputs: the dimensions dynamo made symbolic stay
        symbolic, the others are fixed; "static" when dynamo made none symbolic. Dimensions dynamo
        gave one symbol (the length of ``input_ids`` and of ``attention_mask``) share one named
        ``Dim``, so the captured graph knows them equal as dynamo did; the others are ``Dim.AUTO``."""
        symbolic = [[(d, size) for d, size in enumerate(getattr(fake, "shape", ())) if isinstance(size, torch.SymInt)]
                    for fake in self.user_fakes]
        uses: dict[Any, list[torch.SymInt]] = {}
        for dims in symbolic:
            for _, size in dims:
                uses.setdefault(size.node.expr, []).append(size)
        named = {expr: _named_dim(f"size_{i}", sizes[0])
                 for i, (expr, sizes) in enumerate(uses.items()) if len(sizes) > 1}
        symbolic = [[(d, size.node.expr) for d, size in dims] for dims in symbolic]
        spec = [{d: named.get(expr, torch.export.Dim.AUTO) for d, expr in dims} or None for dims in symbolic]
        # DynamoGraph.forward takes *inputs, which torch.export sees as one tuple argument.
        return (tuple(spec),) if any(spec) else "static"

    def scalar_inputs(self) -> list[int]:
        """The indices of the user inputs that are Python numbers rather than tensors."""
        return [i for i, value in enumerate(self.user_examples) if not isinstance(value, torch.Tensor)]

    def device(self) -> str:
        """Where the user's tensors are, else where the weights are; "cpu" when there are neither."""
        tensors = [x for x in self.user_examples if isinstance(x, torch.Tensor)]
        tensors += list(self.module.parameters()) + list(self.module.buffers())
        return str(tensors[0].device) if tensors else "cpu"

    def _add_user(self, position: int, node: fx.Node, value: Any, source: str | None) -> Slot:
        index = len(self.user_positions)
        self.user_positions.append(position)
        self.user_examples.append(value)
        self.user_fakes.append(node.meta.get("example_value") if isinstance(value, torch.Tensor) else None)
        if source:
            self.user_sources[source] = index
        return Slot("user", index=index)

    def _locate_size(self, node: fx.Node, source: str | None) -> Slot | None:
        """Which user input dimension a size input of dynamo's graph is, or None if none is."""
        match = _PROPERTY.match(source or "")
        if match and match["base"] in self.user_sources:
            return Slot(match["prop"], index=self.user_sources[match["base"]], dim=int(match["dim"]))
        symbol = node.meta.get("example_value")
        if not isinstance(symbol, torch.SymInt):
            return None
        for index, fake in enumerate(self.user_fakes):
            for dim, size in enumerate(getattr(fake, "shape", ())):
                if isinstance(size, torch.SymInt) and size.node.expr == symbol.node.expr:
                    return Slot("size", index=index, dim=dim)
        return None

    def _attach(self, name: str, value: Any, source: str | None) -> str:
        """Store ``value`` in the wrapper under ``name`` (made unique if taken); returns the name used."""
        if not isinstance(value, torch.Tensor) or isinstance(value, torch._subclasses.FakeTensor):
            raise BevelError(f"the model state at {source or name} reached the bevel backend as a "
                             f"{type(value).__name__}; it needs the real weights to bake them into the compiled graph")
        parameter = isinstance(value, torch.nn.Parameter) or "._parameters[" in (source or "")
        # On a clash, number the first part of the path (``dynamo_graph_1.weight``) so the rest of the
        # model's dotted name, which skip patterns match, survives.
        first, dot, rest = name.partition(".")
        candidate, suffix = name, 0
        while not _is_free(self.module, candidate):
            suffix += 1
            candidate = f"{first}_{suffix}{dot}{rest}"
        set_tensor(self.module, candidate, value, as_parameter=parameter)
        return candidate


def lift_attributes(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[tuple[str, torch.Tensor]]]:
    """A copy of ``gm`` whose tensor attributes (get_attr nodes) are extra inputs after its own.

    Returns the copy and, for each lifted tensor, the model's dotted name for it (from dynamo's
    ``dynamo_flat_name_to_original_fqn``, else the attribute name) and the tensor.
    The copy drops node metadata (fake tensors, dynamo's sources): running it needs none.
    """
    fqns = gm.meta.get("dynamo_flat_name_to_original_fqn", {}) if hasattr(gm, "meta") else {}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    lifted: list[tuple[str, torch.Tensor]] = []
    nodes = list(gm.graph.nodes)
    for node in nodes:
        if node.op == "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
    for node in nodes:
        if node.op != "get_attr":
            continue
        try:
            value = get_tensor(gm, node.target)
        except KeyError:  # a submodule or a non-tensor attribute: the graph keeps reading it itself
            continue
        env[node] = graph.placeholder(f"lifted_{node.name}")
        lifted.append((fqns.get(node.target, node.target), value))
    for node in nodes:
        if node not in env:
            env[node] = graph.node_copy(node, lambda n: env[n])
    for node in graph.nodes:
        node.meta = {}
    return fx.GraphModule(gm, graph), lifted


# --- names -----------------------------------------------------------------------------------------

_SOURCE_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']*)'\]|\['([^']*)'\]|\[(\d+)\]|\.(\w+)")
_PROPERTY = re.compile(r"^(?P<base>.+)\.(?P<prop>size|stride)\(\)\[(?P<dim>\d+)\]$")


def weight_name(source: str | None, fallback: str) -> str:
    """A readable dotted name for a weight from dynamo's source text:
    ``L['self']._modules['fc1']._parameters['weight']`` becomes ``fc1.weight``."""
    if source:
        head = re.match(r"^[LG]\['[^']*'\]", source)
        rest = source[head.end():] if head else source
        parts = ["".join(group for group in match.groups() if group) for match in _SOURCE_PART.finditer(rest)]
        parts = [re.sub(r"\W", "_", p) for p in parts if p and not (p.startswith("__") and p.endswith("__"))]
        if not parts and head and head.group(0)[3:-2] != "self":  # a global or local tensor: its own name
            parts = [re.sub(r"\W", "_", head.group(0)[3:-2])]
        if parts and not any(p in ("_modules", "_parameters", "_buffers") for p in parts):
            return ".".join(parts)
    return re.sub(r"\W", "_", fallback).strip("_") or "weight"


def is_weight(node: fx.Node, value: Any, source: str | None) -> bool:
    """Whether a graph input is the model's state (a parameter or buffer) rather than a user input."""
    if isinstance(value, torch.nn.Parameter):
        return True
    if source is not None:
        return "._parameters[" in source or "._buffers[" in source
    return isinstance(value, torch.Tensor) and ("_parameters_" in node.name or "_buffers_" in node.name)


def _named_dim(name: str, size: torch.SymInt) -> Any:
    """A torch.export ``Dim`` over the range dynamo found for ``size`` (a named Dim must cover only
    values the graph accepts, such as BERT's lengths up to its 512 positions)."""
    bounds = size.node.shape_env.var_to_range.get(size.node.expr)
    low, high = (None, None) if bounds is None else (_finite(bounds.lower), _finite(bounds.upper))
    return torch.export.Dim(name, min=low, max=high)


def _finite(bound: Any) -> int | None:
    """A sympy range bound as an int, None when it is infinite."""
    try:
        return int(bound)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return None


def is_model_number(value: Any, source: str | None) -> bool:
    """Whether a graph input is a number the model holds as a plain attribute (a LayerNorm's eps, a
    dropout's p, an attention's scaling): with dynamic shapes dynamo passes those as 0-dim tensors
    that the graph reads with ``.item()``, which torch.export cannot trace (a data-dependent value)."""
    return (isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter) and value.dim() == 0
            and source is not None and source.startswith("L['self']") and "._parameters[" not in source
            and "._buffers[" not in source)


def bake_number(placeholder: fx.Node, number: float | int) -> bool:
    """Put ``number`` where the graph reads ``placeholder.item()`` and remove the input; False (and
    nothing changed) when the graph uses the input otherwise. Like the weights, the number is read
    once, at compile time."""
    users = list(placeholder.users)
    if not users or not all(u.op == "call_method" and u.target == "item" for u in users):
        return False
    for item in users:
        for user in list(item.users):
            user.args = fx.node.map_arg(user.args, lambda n: number if n is item else n)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda n: number if n is item else n)
        placeholder.graph.erase_node(item)
    placeholder.graph.erase_node(placeholder)
    return True


def _source_name(node: fx.Node) -> str | None:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    try:
        return source.name if isinstance(source.name, str) else source.name()
    except Exception:  # no source, or a source kind without a name: callers use the node's name
        return None


def _is_free(root: torch.nn.Module, name: str) -> bool:
    """Whether a weight can be stored at the dotted ``name`` under ``root`` without replacing anything.

    Only the empty modules that storing weights creates may be walked through: a name under the
    wrapped graph itself (``dynamo_graph.x``) or over an existing attribute is taken.
    """
    *path, leaf = name.split(".")
    if not leaf or not all(path):
        return False
    owner = root
    for part in path:
        child = owner._modules.get(part)
        if child is None:
            return not hasattr(owner, part)  # the rest of the path does not exist yet
        if type(child) is not torch.nn.Module:
            return False
        owner = child
    return not hasattr(owner, leaf)
