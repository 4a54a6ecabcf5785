"""The ``torch.compile`` backend: ``torch.compile(model, backend="bevel", options={"passes": "..."})``.

Dynamo hands the backend one FX graph per captured region, with the model's weights either lifted
as graph inputs or held as attributes of the graph. The backend wraps that graph in a module that
owns the weights under the model's own dotted names, runs ``bevel.compile`` on it with the pipeline
from ``options``, and returns a callable that dynamo calls with the graph's full input list.

What a user should know:

- The weights (parameters and buffers) are read once, when a graph dynamo captured is first run:
  later in-place changes to the model's weights are not seen by the compiled code (the model itself
  is never modified). Dynamo decides when to recompile (new shapes, dtypes, ...); each recompile
  runs the pipeline again and keeps its own copy of the rewritten weights.
- Inference only: the compiled code runs without gradients; compile a model in eval mode (a graph
  traced in training mode keeps its dropout).
- A bevel error raised while compiling (a bad pipeline, an unknown option, a model torch.export
  cannot capture) reaches the caller of the compiled model as that same bevel error type
  (``bevel.PipelineError``, ``bevel.BevelError``, ...), not as dynamo's ``BackendCompilerFailed``.
- The backend is registered with dynamo on ``import bevel`` and through the ``torch_dynamo_backends``
  entry point, so ``backend="bevel"`` works without importing bevel first.
"""

from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from bevel.codegen.lower import check_device
from bevel.compiler.pipeline import build_pipeline
from bevel.errors import BevelError, ParamError

BACKEND_NAME = "bevel"

# Every key ``options=`` accepts, with what it means (shown when a key is unknown).
OPTIONS = {
    "passes": "the pipeline, as in bevel.compile (default 'cleanup')",
    "max_fidelity_drop": "the largest accepted drop in cosine similarity per pass (default None: no budget)",
    "device": "where the compiled code runs (default: where the inputs and weights are)",
}

_ENTRY_POINT_GROUP = "torch_dynamo_backends"


# --- registration ----------------------------------------------------------------------------------

def register() -> None:
    """Make ``backend="bevel"`` known to ``torch.compile``; called on ``import bevel``, safe to call again.

    When bevel's entry point is installed, dynamo already finds it on its own and registers it when
    the name is first looked up; registering it here too would make that lookup fail with
    "duplicate name", so this only registers by hand when the entry point is missing (bevel used
    from a source tree that was not pip-installed). That also keeps ``import bevel`` from importing
    dynamo, which takes about a second.
    """
    if _entry_point_installed():
        return
    from torch._dynamo import list_backends, register_backend

    if BACKEND_NAME not in list_backends(exclude_tags=()):
        register_backend(compiler_fn=bevel_backend, name=BACKEND_NAME)


def _entry_point_installed() -> bool:
    from importlib.metadata import entry_points

    return any(ep.name == BACKEND_NAME and ep.value.split(":")[0] == __name__
               for ep in entry_points(group=_ENTRY_POINT_GROUP))


# --- the backend -----------------------------------------------------------------------------------

def bevel_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict[str, Any] | None = None,
                  mode: str | None = None) -> Callable[..., Any]:
    """The dynamo backend: compile the graph ``gm`` with bevel and return a callable taking its inputs.

    ``options`` (from ``torch.compile(..., options={...})``) accepts the keys in :data:`OPTIONS`; an
    unknown key or a bad pipeline raises before any work. Any bevel error is re-raised so that the
    user catches it as the same bevel error type (see :func:`surface_to_user`).
    """
    try:
        settings = parse_options(options, mode)
        return DynamoGraphCompiler(gm, example_inputs, settings).compiled()
    except BevelError as error:
        raise surface_to_user(error) from None


@dataclass
class BackendSettings:
    """The validated ``options`` of one torch.compile call."""

    passes: Any = "cleanup"
    max_fidelity_drop: float | None = None
    device: str | None = None


def parse_options(options: dict[str, Any] | None, mode: str | None = None) -> BackendSettings:
    """Check ``options`` against :data:`OPTIONS` and the pipeline in it; raises a BevelError naming the fault."""
    if mode is not None:
        raise BevelError(f"torch.compile(mode={mode!r}) has no meaning for the bevel backend; give the "
                         f"pipeline as options={{'passes': '...'}} instead")
    options = dict(options or {})
    unknown = [key for key in options if key not in OPTIONS]
    if unknown:
        hints = [f"'{key}' (did you mean '{close[0]}'?)" if (close := difflib.get_close_matches(str(key), OPTIONS, n=1))
                 else f"'{key}'" for key in unknown]
        accepted = "\n".join(f"  {key}: {meaning}" for key, meaning in OPTIONS.items())
        raise BevelError(f"unknown torch.compile option{'s' if len(unknown) > 1 else ''} for the bevel backend: "
                         f"{', '.join(hints)}; the accepted keys are:\n{accepted}")
    settings = BackendSettings(**options)
    # Everything bevel.compile would refuse is refused here, before dynamo's graph is touched.
    build_pipeline(settings.passes)
    drop = settings.max_fidelity_drop
    if drop is not None and (isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0.0 <= drop <= 2.0):
        raise ParamError(f"options['max_fidelity_drop']={drop!r} must be None or a number in [0, 2] "
                         f"(a drop in cosine similarity)", key="max_fidelity_drop")
    if settings.device is not None:
        check_device(settings.device)
    return settings


@functools.cache
def _user_facing_type(error_type: type[BevelError]) -> type[BevelError]:
    """``error_type`` made one that dynamo passes through unwrapped (see :func:`surface_to_user`)."""
    from torch._dynamo.exc import ShortenTraceback

    def __reduce__(self: BevelError) -> tuple[Any, ...]:  # pickles as the plain bevel error
        state = {k: v for k, v in self.__dict__.items() if k != "first_useful_frame"}
        return error_type.__new__, (error_type, *self.args), state

    return type(error_type.__name__, (error_type, ShortenTraceback),
                {"__module__": error_type.__module__, "__qualname__": error_type.__qualname__,
                 "__reduce__": __reduce__})


def surface_to_user(error: BevelError) -> BevelError:
    """``error`` as an exception of the same bevel type that reaches the caller of the compiled model.

    Dynamo wraps an exception raised by a backend in ``BackendCompilerFailed`` (a RuntimeError), so
    ``except bevel.PipelineError`` would miss it. Dynamo lets its own ``ShortenTraceback`` errors
    through unwrapped; the error returned here is an instance of both the original bevel type and
    that class, with the same message and attributes, so the user sees ``bevel.errors.PipelineError:
    ...``. Should that dynamo class ever go away, the error is returned as it is and the user gets
    dynamo's ``BackendCompilerFailed`` whose message quotes it.
    """
    try:
        surfaced_type = _user_facing_type(type(error))
    except (ImportError, TypeError):
        return error
    surfaced = surfaced_type.__new__(surfaced_type, *error.args)
    surfaced.args = error.args
    surfaced.__dict__.update(error.__dict__)
    surfaced.first_useful_frame = None  # keep the whole traceback: ShortenTraceback trims to this frame
    return surfaced.with_traceback(error.__traceback__)


# --- from dynamo's graph to a module bevel.compile can capture -------------------------------------

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
                args.append(functools.reduce(getattr, slot.name.split("."), self))
            elif slot.kind == "size":
                args.append(inputs[slot.index].shape[slot.dim])
            else:
                args.append(inputs[slot.index].stride(slot.dim))
        return self.dynamo_graph(*args)


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


class DynamoGraphCompiler:
    """Compiles one dynamo graph: sorts its inputs, builds the :class:`DynamoGraph`, runs bevel.compile."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list[Any], settings: BackendSettings) -> None:
        self.settings = settings
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(example_inputs):
            raise BevelError(f"dynamo gave {len(example_inputs)} example inputs for a graph with "
                             f"{len(placeholders)} inputs; the bevel backend cannot match them")
        self.compile_id = str(getattr(gm, "meta", {}).get("dynamo_compile_id", "")) or None
        graph_module, lifted = lift_attributes(gm)
        self.module = DynamoGraph(graph_module, [])
        self.user_positions: list[int] = []  # where each user input sits in dynamo's input list
        self.user_examples: list[Any] = []
        self.user_fakes: list[Any] = []  # dynamo's fake tensor of each user input (symbolic sizes)
        self.user_sources: dict[str, int] = {}
        sizes = []
        for position, (node, value) in enumerate(zip(placeholders, example_inputs)):
            source = _source_name(node)
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
        if parameter and not isinstance(value, torch.nn.Parameter):
            value = torch.nn.Parameter(value, requires_grad=False)
        candidate, suffix = name, 0
        while not _try_attach(self.module, candidate, value, parameter):
            suffix += 1
            candidate = f"{name}_{suffix}" if suffix < 100 else "weight_" + name.replace(".", "_") + f"_{suffix}"
        return candidate

    def dynamic_shapes(self) -> Any:
        """torch.export dynamic_shapes for the user inputs: the dimensions dynamo made symbolic stay
        symbolic (``Dim.AUTO``), the others are fixed; "static" when dynamo made none symbolic."""
        spec = [{d: torch.export.Dim.AUTO for d, size in enumerate(getattr(fake, "shape", ()))
                 if isinstance(size, torch.SymInt)} or None for fake in self.user_fakes]
        # DynamoGraph.forward takes *inputs, which torch.export sees as one tuple argument.
        return (tuple(spec),) if any(spec) else "static"

    def device(self) -> str:
        """The ``device`` option, else where the user's tensors (or the weights) are."""
        if self.settings.device is not None:
            return self.settings.device
        tensors = [x for x in self.user_examples if isinstance(x, torch.Tensor)]
        tensors += list(self.module.parameters()) + list(self.module.buffers())
        return str(tensors[0].device) if tensors else "cpu"

    def compiled(self) -> "BevelCompiledGraph":
        """What dynamo calls: the wrapper, compiled by bevel on its first call."""
        scalars = [i for i, value in enumerate(self.user_examples) if not isinstance(value, torch.Tensor)]
        return BevelCompiledGraph(self.module, self.user_positions, scalars, self.dynamic_shapes(),
                                  self.settings, self.device(), self.compile_id)


class BevelCompiledGraph:
    """What the backend returns to dynamo: called with the graph's full input list, it picks the user
    inputs and runs the compiled module on them.

    bevel.compile runs on the first call, with that call's inputs, rather than inside the backend:
    torch.export run while dynamo is still compiling would add its own shape guards to dynamo's (and
    dynamo would then reject the frame it just compiled). Python numbers among the user inputs are
    fixed by torch.export, so each new combination of their values compiles once more and is kept.
    """

    def __init__(self, module: DynamoGraph, user_positions: list[int], scalar_inputs: list[int],
                 dynamic_shapes: Any, settings: BackendSettings, device: str, compile_id: str | None = None) -> None:
        self.module = module
        self.user_positions = user_positions
        self.scalar_inputs = scalar_inputs
        self.dynamic_shapes = dynamic_shapes
        self.settings = settings
        self.device = device
        self.compile_id = compile_id
        self.compiled_by_scalars: dict[tuple[Any, ...], Any] = {}

    def __call__(self, *args: Any) -> Any:
        inputs = tuple(args[i] for i in self.user_positions)
        key = tuple(inputs[i] for i in self.scalar_inputs)
        compiled = self.compiled_by_scalars.get(key)
        if compiled is None:
            compiled = self.compiled_by_scalars[key] = self.compile(inputs)
        return compiled(*inputs)

    def compile(self, inputs: tuple[Any, ...]) -> Any:
        """bevel.compile of the wrapped graph, captured on ``inputs``."""
        from bevel.compiler.compile import compile as bevel_compile

        compiled = bevel_compile(self.module, passes=self.settings.passes, example_inputs=inputs, calibration=None,
                                 device=self.device, max_fidelity_drop=self.settings.max_fidelity_drop,
                                 dynamic_shapes=self.dynamic_shapes)
        if self.compile_id:  # name the report after dynamo's id (as in TORCH_LOGS=recompiles), not the wrapper
            compiled.report.model = f"torch.compile graph {self.compile_id}"
        return compiled


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
        if node.op == "get_attr" and isinstance(value := _fetch(gm, node.target), torch.Tensor):
            env[node] = graph.placeholder(f"lifted_{node.name}")
            lifted.append((fqns.get(node.target, node.target), value))
    for node in nodes:
        if node not in env:
            env[node] = graph.node_copy(node, lambda n: env[n])
    for node in graph.nodes:
        node.meta = {}
    return fx.GraphModule(gm, graph), lifted


# --- helpers ---------------------------------------------------------------------------------------

def is_weight(node: fx.Node, value: Any, source: str | None) -> bool:
    """Whether a graph input is the model's state (a parameter or buffer) rather than a user input."""
    if isinstance(value, torch.nn.Parameter):
        return True
    if source is not None:
        return "._parameters[" in source or "._buffers[" in source
    return isinstance(value, torch.Tensor) and ("_parameters_" in node.name or "_buffers_" in node.name)


def _source_name(node: fx.Node) -> str | None:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    try:
        return source.name if isinstance(source.name, str) else source.name()
    except Exception:  # no source, or a source kind without a name: callers use the node's name
        return None


def _fetch(module: torch.nn.Module, target: str) -> Any:
    try:
        return functools.reduce(getattr, target.split("."), module)
    except AttributeError:
        return None


def _try_attach(root: torch.nn.Module, name: str, value: torch.Tensor, parameter: bool) -> bool:
    """Register ``value`` at the dotted ``name`` under ``root``, creating empty modules on the way;
    False (and nothing registered) when the name or a module on its path is taken by something else."""
    *path, leaf = name.split(".")
    if not leaf or not all(path):
        return False
    owner = root
    for part in path:
        child = owner._modules.get(part)
        if child is not None and type(child) is not torch.nn.Module:  # only modules made here hold weights
            return False
        if child is None:
            if hasattr(owner, part):
                return False
            child = torch.nn.Module()
            owner.add_module(part, child)
        owner = child
    if hasattr(owner, leaf):
        return False
    if parameter:
        owner.register_parameter(leaf, value)
    else:
        owner.register_buffer(leaf, value)
    return True
