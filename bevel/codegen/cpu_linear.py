"""On the CPU, float32 linears run through oneDNN's matrix product where it was measured faster than
PyTorch's own (MKL's GEMM), shape by shape, on the machine that runs them.

Which library multiplies faster depends on the CPU, not on the model. On a 2-core AMD EPYC with
AVX-512, oneDNN (``torch.ops.mkldnn._linear_pointwise`` on the plain weight) ran MiniLM's products
at 4096 rows 1.07-1.14x, ViT-B's 1.26-1.47x and a Llama MLP's at 1 and 32 rows 1.4x and 2.2x faster
than ``F.linear``, and MiniLM and ViT-B whole 1.14x (``benchmarks/cpu_linear_cpu.py``); with both
libraries held to AVX2 on the same CPU, oneDNN ran MiniLM 8% slower. So when a compiled module is
built on the CPU, every distinct (rows, in, out) shape of its float32 linears is timed both ways (at
few or many rows, as the example inputs give them: :func:`timed_rows`) and oneDNN takes the shapes
where it was at least ``ONEDNN_MIN_SPEEDUP`` faster. The timings are kept for the process, so
compiling the same shapes again times nothing.

Only the module that runs changes: :func:`cpu_runner` returns a copy of the graph sharing its
weights, so what is saved and exported to ONNX keeps ``aten.linear``. A saved artifact records the
kernel of each shape and a loaded one runs the same (the two libraries round differently, and a
loaded model should compute exactly what was saved). ``BEVEL_CPU_LINEAR=aten`` (or ``onednn``)
skips the timing and runs every linear one way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from bevel.errors import BevelError
from bevel.ir.attributes import get_tensor
from bevel.ir.meta import concrete
from bevel.runtime.timing import median_latencies_ms

aten = torch.ops.aten

# oneDNN takes a shape only when measured at least this much faster: medians of a few CPU samples
# drift by a few percent, and a linear must never get slower by the choice
ONEDNN_MIN_SPEEDUP = 1.05
WARMUP, REPEATS = 2, 7
# A shape is timed at one of two row counts, so that compiles at other example sizes choose alike (the
# libraries round differently, and a model compiled twice should compute the same): few rows, as a
# decode step or one short input multiplies, or many, where the product's rate has settled
FEW_ROWS, MANY_ROWS = 16, 2048
CHOICE_VARIABLE = "BEVEL_CPU_LINEAR"

_speedups: dict[tuple[int, int, int, int], float] = {}


def onednn_available() -> bool:
    """Whether this torch was built with oneDNN's linear (PyTorch's x86 wheels are)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed by oneDNN."""
    return torch.ops.mkldnn._linear_pointwise.default(x, weight, bias, "none", [], "")


def onednn_speedup(rows: int, inputs: int, outputs: int) -> float:
    """Median time of ``F.linear`` over that of :func:`onednn_linear` for ``rows`` random float32 rows
    of ``inputs`` features into ``outputs`` (with a bias: without one the two differ alike);
    samples alternate so that drift affects both alike."""
    key = (timed_rows(rows), inputs, outputs, torch.get_num_threads())
    if key not in _speedups:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(key[0], inputs, generator=generator)
        weight = torch.randn(outputs, inputs, generator=generator)
        b = torch.randn(outputs, generator=generator)
        calls = {"aten": lambda: F.linear(x, weight, b), "onednn": lambda: onednn_linear(x, weight, b)}
        latency = median_latencies_ms(calls, (), runs=REPEATS, warmup=WARMUP)
        _speedups[key] = latency["aten"] / latency["onednn"]
    return _speedups[key]


def timed_rows(rows: int) -> int:
    """The row count a product of ``rows`` rows is timed at: ``FEW_ROWS`` up to four times that, else
    ``MANY_ROWS``."""
    return FEW_ROWS if rows <= 4 * FEW_ROWS else MANY_ROWS


@dataclass
class ShapeChoice:
    """The kernel chosen for the linears of one shape: ``rows`` x ``inputs`` -> ``outputs``, how many
    linears have it, the measured oneDNN speed-up over ``F.linear`` (None where nothing was timed)."""

    rows: int
    inputs: int
    outputs: int
    linears: int
    kernel: str
    speedup: float | None

    @property
    def key(self) -> tuple[int, int, int]:
        """(rows, inputs, outputs): what identifies the shape in a saved artifact."""
        return self.rows, self.inputs, self.outputs

    def __str__(self) -> str:
        measured = ("" if self.speedup is None
                    else f" (oneDNN measured {self.speedup:.2f}x at {timed_rows(self.rows)} rows)")
        return (f"{self.linears} linear(s) [{self.rows}, {self.inputs}] x [{self.inputs}, {self.outputs}]: "
                f"{self.kernel}{measured}")


def _linear_shape(module: fx.GraphModule, node: fx.Node, rows: int | None) -> tuple[int, int, int] | None:
    """(rows, in, out) of a float32 linear on a weight of the module's, or None where the node is
    not one or its sizes are not known. ``rows`` given replaces the example inputs' row count."""
    if node.op != "call_function" or node.target != aten.linear.default or len(node.args) < 2:
        return None
    x, weight = node.args[0], node.args[1]
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return None
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    try:
        tensor = get_tensor(module, weight.target)
    except KeyError:
        return None
    if not isinstance(val, torch.Tensor) or tensor.dim() != 2:
        return None
    if val.dtype != torch.float32 or tensor.dtype != val.dtype or tensor.device.type != "cpu" or val.dim() < 2:
        return None
    if rows is None:
        try:
            rows = 1
            for dim in val.shape[:-1]:
                rows *= concrete(dim)
        except ValueError:  # a size without an example value
            return None
    return rows, tensor.shape[1], tensor.shape[0]


def _forced_kernel() -> str | None:
    choice = os.environ.get(CHOICE_VARIABLE, "auto")
    if choice not in ("auto", "aten", "onednn"):
        raise BevelError(f"{CHOICE_VARIABLE}={choice!r}: expected 'auto' (time both per shape), 'aten' or 'onednn'")
    return None if choice == "auto" else choice


def cpu_runner(module: fx.GraphModule, kernels: dict[tuple[int, int, int], str] | None = None,
               rows: int | None = None) -> tuple[fx.GraphModule, list[ShapeChoice]]:
    """The module to run on the CPU: ``module`` itself where every linear keeps ``aten.linear``, else a
    copy of its graph sharing its weights with the chosen linears on oneDNN; and the choice per shape.
    ``kernels`` (as :attr:`ShapeChoice.key` -> kernel, what a saved artifact records) are used instead
    of timing, so that a loaded module computes exactly what the saved one did; shapes missing from
    them keep ``aten``. ``rows`` given, every linear is taken to multiply that many rows (a decode
    step multiplies one token per sequence) rather than as many as the example inputs give."""
    forced = _forced_kernel()
    shapes: dict[tuple[int, int, int], list[fx.Node]] = {}
    for node in module.graph.nodes:
        shape = _linear_shape(module, node, rows)
        if shape is not None:
            shapes.setdefault(shape, []).append(node)
    if not shapes or not onednn_available():
        return module, [ShapeChoice(*s, len(n), "aten", None) for s, n in shapes.items()]
    choices, chosen = [], set()
    for shape, nodes in shapes.items():
        speedup = None
        if forced is not None:
            kernel = forced
        elif kernels is not None:
            kernel = kernels.get(shape, "aten")
        else:
            speedup = onednn_speedup(*shape)
            kernel = "onednn" if speedup >= ONEDNN_MIN_SPEEDUP else "aten"
        choices.append(ShapeChoice(*shape, len(nodes), kernel, speedup))
        if kernel == "onednn":
            chosen.update(node.name for node in nodes)
    if not chosen:
        return module, choices
    graph = fx.Graph()
    values: dict[fx.Node, fx.Node] = {}
    for node in module.graph.nodes:
        copied = graph.node_copy(node, lambda n: values[n])
        if node.name in chosen:
            x, weight = copied.args[0], copied.args[1]
            bias = copied.args[2] if len(copied.args) > 2 else copied.kwargs.get("bias")
            copied.target, copied.args, copied.kwargs = torch.ops.mkldnn._linear_pointwise.default, (
                x, weight, bias, "none", [], ""), {}
        values[node] = copied
    graph._codegen = module.graph._codegen  # the model's input and output structure
    return fx.GraphModule(module, graph), choices
