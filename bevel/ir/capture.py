"""``capture``: turn an nn.Module into a :class:`Graph` through torch.export (non-strict); and
``export_compiled``, the same export of a compiled graph again, as saving an artifact needs it."""

from __future__ import annotations

import contextlib
import logging
import inspect
import io
import os
import sys
import threading
import traceback
import warnings
from typing import Any

import torch
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
import torch.utils._pytree as pytree
from torch.nn.attention import SDPBackend, sdpa_kernel

from bevel.errors import CaptureError
from bevel.ir.attributes import set_inference_flags
from bevel.ir.graph import Graph
from bevel.ir.meta import OLD_FAKE_KERNELS, quiet_logger


def auto_dynamic_shapes(example_inputs: tuple[Any, ...], model: torch.nn.Module | None = None) -> tuple[Any, ...]:
    """Let torch.export decide every dimension of every tensor input (``Dim.AUTO``).

    Dimensions the model does not tie to a constant (batch, sequence, image size) stay symbolic,
    so the graph serves other batch sizes and lengths and exports to ONNX with dynamic axes.
    Given the ``model``, inputs that its ``forward(*args)`` collects are grouped as torch.export
    expects.
    """
    auto = torch.export.Dim.AUTO

    def spec(x: Any) -> Any:
        return {d: auto for d in range(x.dim())} if isinstance(x, torch.Tensor) else None

    # inputs nested in dicts, lists and tuples get a spec of the same structure, as torch.export expects
    specs = tuple(pytree.tree_map(spec, x) for x in example_inputs)
    if model is not None:
        try:
            parameters = list(inspect.signature(model.forward).parameters.values())
        except (TypeError, ValueError):  # no inspectable signature: assume plain positional inputs
            parameters = []
        for index, parameter in enumerate(parameters):
            if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
                return specs[:index] + (specs[index:],)
    return specs


def capture(model: torch.nn.Module, example_inputs: tuple[Any, ...],
            dynamic_shapes: Any = None, defer_guards: bool = False) -> Graph:
    """Capture ``model`` called on ``example_inputs`` as a Graph.

    ``dynamic_shapes`` is None (every input dimension may vary where the model allows it),
    ``"static"`` (shapes fixed to the example inputs), or a torch.export ``dynamic_shapes`` spec.
    With ``defer_guards``, when a condition on the dynamic sizes cannot be proven for their whole
    range, the capture is made again with such conditions as checks in the graph, run with each
    call, instead of failing: for captures whose sizes are known to vary (a decoder's cache length),
    where older torch versions fail to prove conditions that hold for every size (torch 2.11 on
    transformers' ``repeat_kv`` of grouped-query attention: ``min(16 L, 32 L) == 16 L``). Captures
    that succeed the first time are unchanged.
    Raises CaptureError quoting the first failing line of the model's code when torch.export fails.
    The model is not modified, but the Graph shares its weight tensors: passes replace weights
    (``Graph.set_param``) rather than write into them, and ``bevel.compile`` captures a copy.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"expected a torch.nn.Module to capture, got {type(model).__name__}")
    if not isinstance(example_inputs, tuple):
        example_inputs = tuple(example_inputs) if isinstance(example_inputs, list) else (example_inputs,)
    automatic = dynamic_shapes is None
    if automatic:
        dynamic_shapes = auto_dynamic_shapes(example_inputs, model)
    elif dynamic_shapes == "static":
        dynamic_shapes = None
    printed = io.StringIO()
    try:
        # torch's log warnings are silenced: a failure is reported once, as a CaptureError
        with quiet_logger("torch", logging.ERROR), _slow_capture_hint(model, dynamic_shapes is not None), \
                contextlib.redirect_stderr(printed):
            try:
                program = torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes, strict=False)
            except Exception as error:
                if not (defer_guards and "Constraints violated" in str(error)):
                    raise
                program = torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes, strict=False,
                                              prefer_deferred_runtime_asserts_over_guards=True)
    except Exception as error:  # torch.export fails with many exception types; all become one clear error
        # what torch printed on the way (partial graphs) is dropped: the CaptureError says what failed
        raise CaptureError(describe_capture_failure(model, error)) from error
    sys.stderr.write(printed.getvalue())
    module = program.module()
    set_inference_flags(module)  # eval() is refused on exported modules; the flag still matters to exporters
    if automatic:
        _warn_of_sizes_fixed_at_one(model, module, example_inputs)
    return Graph(module, example_inputs)


# after this long, a capture with symbolic sizes says that fixed sizes may be far faster
SLOW_CAPTURE_SECONDS = 60.0


@contextlib.contextmanager
def _slow_capture_hint(model: torch.nn.Module, symbolic: bool) -> Any:
    """While torch.export runs, say on stderr once it has taken :data:`SLOW_CAPTURE_SECONDS`. With
    symbolic sizes, a model that computes much with its input's sizes can take many minutes to capture,
    silently (torchvision's Swin-T, which partitions its feature maps into windows: 4 minutes on a
    2-core CPU at 64x64 images, 2 s with fixed sizes)."""
    stream = sys.stderr  # taken before torch's own output is redirected

    def hint() -> None:
        stream.write(f"bevel: capturing {type(model).__name__} with torch.export has taken "
                     f"{SLOW_CAPTURE_SECONDS:.0f} s so far"
                     + (": with symbolic input sizes, a model that computes with its sizes (window partitions, "
                        "size-dependent reshapes) can take many minutes; fixed sizes (dynamic_shapes=\"static\", "
                        "or --static-shapes on the command line) may capture in seconds" if symbolic else "")
                     + "\n")
        stream.flush()

    timer = threading.Timer(SLOW_CAPTURE_SECONDS, hint)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _warn_of_sizes_fixed_at_one(model: torch.nn.Module, module: torch.fx.GraphModule,
                                example_inputs: tuple[Any, ...]) -> None:
    """Warn where an example input's dimension of size 1 came out fixed: torch.export takes sizes 0
    and 1 for constants, so a batch-1 example gives a graph that takes batches of 1 only. A dimension
    the model itself fixes at 1 (the channel of grayscale images a conv reads) is not named: the model
    is run once with that dimension at 2 (and the same dimension of the other inputs fixed at 1 with
    it, as a batch of ids and its mask are), and a failure says the model allows nothing else."""
    leaves, spec = pytree.tree_flatten(example_inputs)
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    if len(leaves) != len(placeholders):
        return
    ones = []
    for index, (leaf, node) in enumerate(zip(leaves, placeholders)):
        value = node.meta.get("val")
        if isinstance(leaf, torch.Tensor) and isinstance(value, torch.Tensor):
            ones += [(index, dim) for dim, size in enumerate(value.shape) if leaf.shape[dim] == 1
                     and isinstance(size, int)]
    # one probe per dimension number, with every input fixed at 1 there (ids and mask share a batch)
    takes_two = {dim: _model_takes_two(model, leaves, spec, [i for i, d in ones if d == dim], dim)
                 for dim in {d for _, d in ones}}
    fixed = [f"input {index} dimension {dim}" for index, dim in ones if takes_two[dim]]
    if fixed:
        warnings.warn(f"the example inputs fix {', '.join(fixed)} at 1 (torch.export takes a size of 1 for a "
                      f"constant): the result takes only 1 there; capture with 2 or more in it (a batch of 2) to "
                      f"keep it variable", stacklevel=_first_caller_outside_bevel())


def _model_takes_two(model: torch.nn.Module, leaves: list[Any], spec: Any, indices: list[int], dim: int) -> bool:
    """Whether ``model`` runs with the input leaves ``indices`` repeated to size 2 along ``dim``."""
    probe = [torch.cat([leaf] * 2, dim=dim) if i in indices else leaf for i, leaf in enumerate(leaves)]
    try:
        with torch.no_grad():
            model(*pytree.tree_unflatten(probe, spec))
    except Exception:  # the model refuses the size, with whatever error its ops raise
        return False
    return True


def _first_caller_outside_bevel() -> int:
    """The ``stacklevel`` that points a warning at the user's line: the first caller outside this package."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1  # level 1: the function that warns
    while frame is not None and frame.f_code.co_filename.startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def export_compiled(module: torch.nn.Module, example_inputs: tuple[Any, ...], dynamic_shapes: Any) -> Any:
    """``torch.export`` (non-strict) of a compiled graph module, as saving an artifact does it.

    On torch 2.11 the CPU attention kernel is chosen by asking whether the query's batch is 1, which
    a size made at run time (a packed batch's row count) cannot answer, so that export fails; it is
    then made again under the math kernel, which asks nothing and traces to the same
    ``scaled_dot_product_attention`` node. Not first: the math kernel's output is contiguous where the
    others follow the query's layout, which a graph that views the output without a copy (PyTorch's
    MultiheadAttention) relies on."""
    try:
        return torch.export.export(module, example_inputs, dynamic_shapes=dynamic_shapes, strict=False)
    except GuardOnDataDependentSymNode:
        if not OLD_FAKE_KERNELS:
            raise
    with sdpa_kernel([SDPBackend.MATH]):
        return torch.export.export(module, example_inputs, dynamic_shapes=dynamic_shapes, strict=False)


_TORCH_DIR = os.path.dirname(torch.__file__)
_BEVEL_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model_frame(error: BaseException) -> traceback.FrameSummary | None:
    """The deepest traceback frame outside torch and bevel: where the model's own code failed."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not f.filename.startswith((_TORCH_DIR, _BEVEL_DIR)) and "<" not in f.filename]
    return frames[-1] if frames else None


def _suggestion(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    if "data-dependent" in text or "DataDependent" in text or "GuardOnDataDependent" in text:
        return ("the model branches on the values of a tensor; rewrite the branch with torch.where or "
                "torch.cond, or move it out of forward()")
    if "is not a known type" in text or "register a pytree" in text:
        return ("the model takes or returns a Python type torch.export cannot flatten (a transformers KV cache, "
                "say): return tensors instead, e.g. set model.config.use_cache = False")
    if "Constraints violated" in text or "specializ" in text:
        return ("pass dynamic_shapes=\"static\" (bevel CLI: --static-shapes) to capture with the example "
                "input shapes fixed")
    return ("check that the model runs eagerly on example_inputs, call model.eval(), and see "
            "https://pytorch.org/docs/stable/export.html for unsupported Python constructs")


def describe_capture_failure(model: torch.nn.Module, error: BaseException) -> str:
    """A short message: which model, the first line of the error, the failing frame, what to try."""
    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    lines = [f"could not capture {type(model).__name__} with torch.export: {type(error).__name__}: {first_line}"]
    frame = _model_frame(error)
    if frame is not None:
        lines.append(f"  at {frame.filename}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}")
    lines.append(f"  try: {_suggestion(error)}")
    return "\n".join(lines)
