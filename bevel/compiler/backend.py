"""The ``torch.compile`` backend: ``torch.compile(model, backend="bevel", options={"passes": "..."})``.

Dynamo hands the backend one FX graph per captured region. The backend checks ``options``, wraps
the graph in a module that owns the model's weights (:mod:`bevel.compiler.dynamo_graph`) and returns
a callable that runs ``bevel.compile`` on that module at its first call.

What a user should know:

- The weights (parameters and buffers) are read once, when a graph dynamo captured is first run:
  later in-place changes to the model's weights are not seen by the compiled code (the model itself
  is never modified). Dynamo decides when to recompile (new shapes, dtypes, ...); each recompile
  runs the pipeline again and keeps its own copy of the rewritten weights.
- Inference only: the compiled code runs without gradients; a model in training mode (dropout or
  batch norm in training mode in the graph) is refused: call ``model.eval()`` first.
- A bevel error raised while compiling (a bad pipeline, an unknown option, a model torch.export
  cannot capture) reaches the caller of the compiled model as that same bevel error type
  (``bevel.PipelineError``, ``bevel.BevelError``, ...), not as dynamo's ``BackendCompilerFailed``
  (see :mod:`bevel.compiler.dynamo_errors`).
- The backend is registered with dynamo on ``import bevel`` and through the ``torch_dynamo_backends``
  entry point, so ``backend="bevel"`` works without importing bevel first.
- Each graph's report (what every pass did, fidelity, sizes) is kept: :func:`reports` returns the
  latest ones, in the order the graphs were compiled.
"""

from __future__ import annotations

import collections
import difflib
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch.fx as fx
import torch.nn.functional as F

from bevel.codegen.lower import check_device
from bevel.compiler.compile import check_fidelity_budget
from bevel.compiler.dynamo_errors import surface_to_user
from bevel.compiler.dynamo_graph import WrappedGraph
from bevel.compiler.pipeline import build_pipeline
from bevel.errors import BevelError

BACKEND_NAME = "bevel"

# the reports of the graphs compiled last (a bound, since a long-running process may recompile often)
_REPORTS: collections.deque = collections.deque(maxlen=64)


def reports() -> list[Any]:
    """The :class:`~bevel.compiler.report.Report` of each graph the backend compiled, oldest first
    (the last 64): a ``torch.compile`` user's way to see what the passes did."""
    return list(_REPORTS)


# Every key ``options=`` accepts, with what it means (shown when a key is unknown).
OPTIONS = {
    "passes": "the pipeline, as in bevel.compile (default 'cleanup')",
    "max_fidelity_drop": "the largest accepted drop in cosine similarity of the outputs against the original "
                         "model, checked after each pass; a pass that goes beyond it is rolled back "
                         "(default None: no budget)",
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
    user catches it as the same bevel error type.
    """
    try:
        settings = parse_options(options, mode)
        check_inference_mode(gm)
        return BevelCompiledGraph(WrappedGraph(gm, example_inputs), settings)
    except BevelError as error:
        raise surface_to_user(error) from None


# functional ops whose ``training`` argument, when true, makes them behave as in training
_TRAINING_OPS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                 F.batch_norm)


def check_inference_mode(gm: fx.GraphModule) -> None:
    """Refuse a graph dynamo traced from a model in training mode (dropout active, batch norm reading the
    batch's statistics): bevel compiles for inference, and ``bevel.compile`` puts its copy in eval mode,
    which a torch.compile backend cannot do for the model."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _TRAINING_OPS:
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
            bound.apply_defaults()
            if bound.arguments.get("training") is True:
                found.append(node.target.__name__)
    if found:
        raise BevelError(f"the model is in training mode ({', '.join(sorted(set(found)))} in training mode in the "
                         f"graph): the bevel backend compiles for inference; call model.eval() before "
                         f"torch.compile(model, backend='bevel')")


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
    if options is not None and not isinstance(options, dict):
        raise BevelError(f"torch.compile(options=...) for the bevel backend must be a dict such as "
                         f"{{'passes': 'cleanup | ...'}}, got a {type(options).__name__}: {options!r}")
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
    check_fidelity_budget(settings.max_fidelity_drop)
    if settings.device is not None:
        check_device(settings.device)
    return settings


class BevelCompiledGraph:
    """What the backend returns to dynamo: called with the graph's full input list, it picks the user
    inputs and runs the compiled module on them.

    bevel.compile runs on the first call, with that call's inputs, rather than inside the backend:
    torch.export run while dynamo is still compiling would add its own shape guards to dynamo's (and
    dynamo would then reject the frame it just compiled). Python numbers among the user inputs are
    fixed by torch.export, so each new combination of their values compiles once more and is kept.
    """

    def __init__(self, graph: WrappedGraph, settings: BackendSettings) -> None:
        self.module = graph.module
        self.user_positions = graph.user_positions
        self.scalar_inputs = graph.scalar_inputs()
        self.dynamic_shapes = graph.dynamic_shapes()
        self.settings = settings
        self.device = settings.device if settings.device is not None else graph.device()
        self.compile_id = graph.compile_id
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
        _REPORTS.append(compiled.report)
        return compiled
