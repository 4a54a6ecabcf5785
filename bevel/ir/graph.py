"""``Graph``: the captured model as an fx GraphModule whose parameters are attributes, with helpers to rewrite it."""

from __future__ import annotations

import copy
from typing import Any, Iterator

import torch
import torch.fx as fx

from bevel.ir import attributes, meta

# node.meta key: the name of the pass that made the node (None for captured nodes), for errors that
# name it; set by the pass manager, kept by graph copies
MADE_BY = "bevel_made_by"


class Graph:
    """A model captured by torch.export, held as an fx GraphModule with its weights as attributes.

    Passes read and rewrite it in place: iterate nodes, replace them, read and write parameters.
    Every node carries ``meta["val"]`` (a fake tensor: shape and dtype); call :meth:`refresh` after a
    rewrite to recompute it and regenerate the module's code. ``example_inputs`` are the inputs the
    graph was captured with.
    """

    def __init__(self, module: fx.GraphModule, example_inputs: tuple[Any, ...]) -> None:
        self.module = module
        self.example_inputs = tuple(example_inputs)

    # -- nodes ---------------------------------------------------------------------------------

    @property
    def fx_graph(self) -> fx.Graph:
        """The underlying ``torch.fx.Graph``."""
        return self.module.graph

    def nodes(self, op: str | None = None, target: Any = None) -> Iterator[fx.Node]:
        """The nodes in order, optionally only those with this ``op`` (placeholder, get_attr,
        call_function, output) and/or this call ``target`` (an op overload or a tuple of them)."""
        targets = target if isinstance(target, (tuple, list, set)) else (target,)
        for node in list(self.fx_graph.nodes):
            if op is not None and node.op != op:
                continue
            if target is not None and node.target not in targets:
                continue
            yield node

    def inputs(self) -> list[fx.Node]:
        """The placeholder nodes: the model's flattened tensor inputs."""
        return list(self.nodes(op="placeholder"))

    def replace_node(self, old: fx.Node, new: fx.Node | Any) -> None:
        """Make every user of ``old`` use ``new`` instead, then erase ``old``."""
        old.replace_all_uses_with(new)
        self.fx_graph.erase_node(old)

    # -- parameters ----------------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer of the module by dotted name (one entry per name)."""
        found = dict(self.module.named_parameters(remove_duplicate=False))
        found.update(self.module.named_buffers(remove_duplicate=False))
        return found

    def param(self, name: str) -> torch.Tensor:
        """The parameter or buffer stored at the dotted ``name``."""
        return attributes.get_tensor(self.module, name)

    def set_param(self, name: str, value: torch.Tensor, as_parameter: bool | None = None) -> None:
        """Store ``value`` at ``name``: as a Parameter if ``as_parameter``, else as a buffer; when
        ``as_parameter`` is None, keep the kind of the tensor it replaces (a new one becomes a buffer).

        The tensor is replaced, never written in place, so a weight shared with another module
        (the model a graph was captured from) is left intact.
        """
        try:
            old = self.param(name)
        except KeyError:
            old = None
        if as_parameter is None:
            as_parameter = isinstance(old, torch.nn.Parameter)
        if as_parameter:
            # keep the flag of the weight it replaces: it decides which kernels some ops pick
            requires_grad = old.requires_grad if isinstance(old, torch.nn.Parameter) else False
            value = torch.nn.Parameter(value.detach(), requires_grad=requires_grad)
        attributes.set_tensor(self.module, name, value if as_parameter else value.detach(), as_parameter)

    def delete_param(self, name: str) -> None:
        """Remove the attribute ``name`` from the module (after its last get_attr is gone)."""
        owner, leaf = attributes.owner_of(self.module, name)
        delattr(owner, leaf)

    def add_param(self, base_name: str, value: torch.Tensor, before: fx.Node,
                  as_parameter: bool = False) -> fx.Node:
        """Store ``value`` under a fresh name derived from ``base_name`` and return a get_attr node for it,
        inserted before ``before``."""
        name, i = base_name, 0
        while attributes.has_attribute(self.module, name):
            i += 1
            name = f"{base_name}_{i}"
        self.set_param(name, value, as_parameter=as_parameter)
        with self.fx_graph.inserting_before(before):
            node = self.fx_graph.get_attr(name)
        node.meta["val"] = meta.fake_of(self, value)
        return node

    def is_tensor_attr(self, node: Any) -> bool:
        """Whether ``node`` is a get_attr of a tensor (get_attr also reads subgraphs of higher-order ops)."""
        if not (isinstance(node, fx.Node) and node.op == "get_attr"):
            return False
        try:
            self.param(node.target)
        except KeyError:
            return False
        return True

    def is_parameter(self, node: Any) -> bool:
        """Whether ``node`` is a get_attr of an ``nn.Parameter`` (a weight rather than a buffer or constant)."""
        return self.is_tensor_attr(node) and isinstance(self.param(node.target), torch.nn.Parameter)

    def remove_unused_params(self) -> list[str]:
        """Delete get_attr nodes nobody uses and the attributes no get_attr reads; returns the names removed."""
        for node in self.nodes(op="get_attr"):
            if not node.users:
                self.fx_graph.erase_node(node)
        used = {node.target for node in self.nodes(op="get_attr")}
        removed = [name for name in self.tensors() if name not in used]
        for name in removed:
            self.delete_param(name)
        return removed

    # -- metadata and checks -------------------------------------------------------------------

    def shape(self, node: fx.Node) -> tuple[int | torch.SymInt, ...] | None:
        """The node's shape (symbolic dims stay SymInts), or None if it is not a tensor."""
        val = node.meta.get("val")
        return tuple(val.shape) if isinstance(val, torch.Tensor) else None

    def dtype(self, node: fx.Node) -> torch.dtype | None:
        """The node's dtype, or None if it is not a tensor."""
        val = node.meta.get("val")
        return val.dtype if isinstance(val, torch.Tensor) else None

    def refresh(self, shapes: bool = True) -> None:
        """After a rewrite: drop dead nodes and unused weights, recompute shapes, regenerate code.
        Without ``shapes`` only dead nodes go and the code is regenerated: enough for a trial copy
        that is only run (recomputing shapes is most of a refresh's time)."""
        self.fx_graph.eliminate_dead_code()
        if shapes:
            self.remove_unused_params()
            meta.propagate(self)
        self.module.recompile()

    def lint(self) -> list[str]:
        """Structural problems of the graph, as sentences; an empty list means it is well formed."""
        from bevel.ir.lint import lint_graph

        return lint_graph(self)

    def copy(self) -> "Graph":
        """An independent copy: weights and graph are duplicated, so rewriting one leaves the other intact."""
        return Graph(copy.deepcopy(self.module), self.example_inputs)

    def __call__(self, *args: Any) -> Any:
        return self.module(*args)

    # -- views ---------------------------------------------------------------------------------

    def __str__(self) -> str:
        from bevel.ir.printer import format_graph

        return format_graph(self)

    def to_networkx(self):  # -> networkx.DiGraph
        """A networkx DiGraph of the nodes (by name, with op, target, shape and dtype) and their data edges."""
        import networkx as nx

        view = nx.DiGraph()
        for node in self.fx_graph.nodes:
            view.add_node(node.name, op=node.op, target=str(node.target), shape=self.shape(node),
                          dtype=self.dtype(node))
            for source in node.all_input_nodes:
                view.add_edge(source.name, node.name)
        return view
