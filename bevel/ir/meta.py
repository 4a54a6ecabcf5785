"""Shape and dtype metadata on graph nodes: recomputed with fake tensors after every rewrite."""

from __future__ import annotations

import contextlib
import logging
import weakref
from typing import TYPE_CHECKING, Any

import sympy
import torch
import torch.fx as fx
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode, free_unbacked_symbols
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

if TYPE_CHECKING:
    from bevel.ir.graph import Graph


def fake_mode_of(graph: "Graph"):
    """The fake-tensor mode the graph was captured under (it owns the symbolic batch/sequence sizes)."""
    values = [n.meta.get("val") for n in graph.inputs()]
    mode = detect_fake_mode([v for v in values if isinstance(v, torch.Tensor)])
    if mode is None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
    return mode


def fake_of(graph: "Graph", value: torch.Tensor) -> Any:
    """A fake tensor standing for ``value`` in the graph's fake mode."""
    return fake_mode_of(graph).from_tensor(value, static_shapes=True)


# Fake kernels of torch 2.11 that re-propagation after a rewrite cannot use, so the values of their
# ops are made from the inputs' shapes: linear on symbolic sizes folds the leading dimensions by
# their example values ([B, T, C] comes out as [2, B*T // 2, N]; a 4-D input fails on a concrete
# element count); scaled_dot_product_attention with a mask of a symbolic batch [B, 1, 1, N] fixes the
# batch to its example value (a token merge's proportional attention), and it asks whether a size
# made by an op at run time (a packed batch's row count) is 1; matmul reads such a size as an int
# (the keys of a pruned token count), so it is made from the shapes where it fails.
OLD_FAKE_KERNELS = tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 12)


def linear_value(x: torch.Tensor, weight: torch.Tensor, *_: Any) -> torch.Tensor:
    """The value of ``aten.linear(x, weight, bias)`` as far as metadata goes: ``x``'s leading sizes
    and the weight's output size, in ``x``'s dtype and device."""
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def attention_value(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *_: Any) -> torch.Tensor:
    """The value of ``aten.scaled_dot_product_attention(query, key, value, ...)`` as far as metadata
    goes: the query's sizes with the value's head size, in the query's dtype and device, laid out as
    the query where the head sizes agree (as the CPU and CUDA kernels return it)."""
    if value.shape[-1] == query.shape[-1]:
        return torch.empty_like(query)
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def matmul_value(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """The value of ``aten.matmul(a, b)`` as far as metadata goes: the broadcast batch sizes, ``a``'s
    rows and ``b``'s columns; None for a vector operand (not needed so far)."""
    if a.dim() < 2 or b.dim() < 2:
        return None
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return a.new_empty((*batch, a.shape[-2], b.shape[-1]))


# on torch 2.11, what the value of an op is made of always, and where its fake kernel fails
_SHAPE_ONLY_VALUES = {torch.ops.aten.linear.default: linear_value,
                      torch.ops.aten.scaled_dot_product_attention.default: attention_value}
_SHAPE_ONLY_ON_GUARD = {torch.ops.aten.matmul.default: matmul_value}


class _ValueProp(FakeTensorProp):
    """FakeTensorProp that also records plain numbers as values (a ``sym_size`` of a static size is
    an int): newer torch does so itself, torch 2.11 left such nodes without ``val``. On torch 2.11,
    the values of linear, attention and matmul are made from their inputs' shapes (see ``OLD_FAKE_KERNELS``)."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, (int, float, bool)):
            n.meta["val"] = result
        return result

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if OLD_FAKE_KERNELS and target in _SHAPE_ONLY_VALUES:
            return _SHAPE_ONLY_VALUES[target](*args)
        try:
            return super().call_function(target, args, kwargs)
        except GuardOnDataDependentSymNode:
            shape_only = _SHAPE_ONLY_ON_GUARD.get(target) if OLD_FAKE_KERNELS else None
            value = shape_only(*args) if shape_only is not None else None
            if value is None:
                raise
            return value


def propagate(graph: "Graph") -> None:
    """Recompute ``meta["val"]`` of every node from the inputs' (possibly symbolic) fake values."""
    mode = fake_mode_of(graph)
    inputs = []
    for node in graph.inputs():
        val = node.meta.get("val")
        # an input given as None is a placeholder only torch.export's input guards (a call_module) read
        if val is None and any(user.op != "call_module" for user in node.users):
            raise ValueError(f"input '{node.name}' has no recorded example value")
        inputs.append(val)
    allow = mode.allow_non_fake_inputs
    mode.allow_non_fake_inputs = True  # weights are real tensors read through get_attr
    # Recomputing values must not narrow the graph's shapes: a guard an op takes here (the C++ upsample
    # kernel below reads a symbolic batch as its example's value before it fails) would otherwise fix
    # that size for good in the shape environment (HRNet's captured batch came out fixed at 2).
    suppressed = mode.shape_env.suppress_guards() if mode.shape_env is not None else contextlib.nullcontext()
    try:
        with suppressed:
            try:
                # torch's fake tensors log a failing kernel at ERROR level; the error is raised anyway, and the
                # one below is expected and retried (its traceback was printed on every successful refresh)
                with quiet_logger("torch._subclasses.fake_tensor", logging.CRITICAL):
                    _ValueProp(graph.module, mode=mode).propagate_dont_convert_inputs(*inputs)
            except RuntimeError as error:
                if "expected to contain only concrete integers" not in str(error):
                    raise
                # as torch.export traces: ops whose C++ composite kernels need concrete sizes (upsample's
                # ``.vec`` forms, given an output size computed from a symbolic input size) decompose in
                # Python; only then, since the Python dispatcher makes every op slower (10-40% here)
                with enable_python_dispatcher():
                    _ValueProp(graph.module, mode=mode).propagate_dont_convert_inputs(*inputs)
    finally:
        mode.allow_non_fake_inputs = allow
    _record_data_dependent_sizes(graph)


@contextlib.contextmanager
def quiet_logger(name: str, level: int):
    """Raise the logger ``name`` to ``level`` for the block (records below it are dropped)."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


# shape env -> {unbacked symbol: its value on the example inputs}; weak, so it dies with its graph
_EXAMPLE_SIZES: "weakref.WeakKeyDictionary[Any, dict[Any, int]]" = weakref.WeakKeyDictionary()


def _unbacked(dim: Any) -> list[Any]:
    """The symbols of a size that the example inputs do not fix (sizes made by ops at run time)."""
    if not isinstance(dim, torch.SymInt):
        return []
    return list(free_unbacked_symbols(dim))


def _record_data_dependent_sizes(graph: "Graph") -> None:
    """Give sizes that ops decide at run time (a token merge's output length: an unbacked symbol)
    the value they take on the example inputs, found by running the graph once, so that analyses
    (FLOPs, bytes) can count them as they count the inputs' sizes."""
    nodes = [n for n in graph.fx_graph.nodes if isinstance(v := n.meta.get("val"), torch.Tensor)
             and any(_unbacked(d) for d in v.shape)]
    if not nodes:
        return
    env = next(d for d in nodes[0].meta["val"].shape if _unbacked(d)).node.shape_env
    known = _EXAMPLE_SIZES.setdefault(env, {})
    wanted = set(nodes)
    real: dict[fx.Node, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            value = super().run_node(n)
            if n in wanted:
                real[n] = value
            return value

    with torch.no_grad():
        Recorder(graph.module).run(*graph.example_inputs)
    for node, value in real.items():
        for dim, size in zip(node.meta["val"].shape, value.shape):
            if isinstance(dim, torch.SymInt) and dim.node.expr.is_Symbol and _unbacked(dim):
                known.setdefault(dim.node.expr, sympy.Integer(int(size)))


def concrete(dim: Any) -> int:
    """An int for a dimension: symbolic sizes give the value they had in the example inputs."""
    if isinstance(dim, torch.SymInt):
        hint = dim.node.hint
        if hint is None and _unbacked(dim):
            env = dim.node.shape_env
            # the input sizes' example values: named backed_var_to_val in newer torch, var_to_val before
            backed = env.backed_var_to_val if hasattr(env, "backed_var_to_val") else getattr(env, "var_to_val", {})
            expr = dim.node.expr.xreplace(_EXAMPLE_SIZES.get(env, {})).xreplace(backed)
            hint = None if expr.free_symbols else expr
        if hint is None:
            raise ValueError(f"size {dim} has no example value")
        return int(hint)
    return int(dim)
