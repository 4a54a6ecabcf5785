"""``CompiledModule``: what ``bevel.compile`` returns and ``bevel.load`` restores: call it like the model."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from bevel.codegen.cpu_linear import ShapeChoice, cpu_runner
from bevel.compiler.report import Report
from bevel.errors import BevelError


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _a(noun: str) -> str:
    """``noun`` with its indefinite article: "a float", "an int"."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def input_specs(module: fx.GraphModule, example_inputs: tuple[Any, ...]) -> list[dict[str, Any]]:
    """Name, dtype and shape of each graph input; symbolic dimensions are given by their symbol name.
    A Python number input (torch.export fixes its value into the graph) also has its ``value``."""
    specs = []
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    for node, example in zip(placeholders, example_inputs):
        val = node.meta.get("val", example)
        if isinstance(val, torch.Tensor):
            shape = [int(d) if is_concrete_int(d) else str(d) for d in val.shape]
            specs.append({"name": node.name, "dtype": _dtype_name(val.dtype), "shape": shape})
        elif isinstance(val, (bool, int, float)):
            specs.append({"name": node.name, "dtype": type(val).__name__, "shape": None, "value": val})
        else:
            specs.append({"name": node.name, "dtype": type(val).__name__, "shape": None})
    return specs


def input_mismatch(specs: list[dict[str, Any]], args: tuple[Any, ...]) -> str | None:
    """What in ``args`` does not fit the graph's input ``specs`` (see :func:`input_specs`), or None."""
    if len(args) != len(specs):
        names = ", ".join(spec["name"] for spec in specs)
        return f"it takes {len(specs)} positional input{'s' if len(specs) != 1 else ''} ({names}), got {len(args)}"
    for i, (spec, arg) in enumerate(zip(specs, args)):
        where = f"input {i} ({spec['name']})"
        if "value" in spec and (not isinstance(arg, (bool, int, float)) or arg != spec["value"]):
            got = repr(arg) if isinstance(arg, (bool, int, float)) else _a(type(arg).__name__)
            return (f"{where} is a Python number, which the capture fixed into the graph as {spec['value']!r}; got "
                    f"{got}: compile the model with that value, or make it a tensor input")
        if spec["shape"] is None:
            continue
        expected = "[" + ", ".join(str(d) for d in spec["shape"]) + "]"
        if not isinstance(arg, torch.Tensor):
            return f"{where} should be a {spec['dtype']} tensor of shape {expected}, got {_a(type(arg).__name__)}"
        if _dtype_name(arg.dtype) != spec["dtype"]:
            return f"{where} should be {spec['dtype']}, got {_dtype_name(arg.dtype)}"
        shape = spec["shape"]
        if arg.dim() != len(shape) or any(isinstance(d, int) and d != n for d, n in zip(shape, arg.shape)):
            return f"{where} should have shape {expected} (named sizes may vary), got {list(arg.shape)}"
    return None


def on_cpu(module: fx.GraphModule, kernels: dict[tuple[int, int, int], str] | None, rows: int | None = None
           ) -> tuple[fx.GraphModule, list[ShapeChoice]]:
    """What runs ``module`` on the CPU (:func:`bevel.codegen.cpu_linear.cpu_runner`); on another device
    the module itself."""
    from bevel.codegen.lower import graph_devices

    return cpu_runner(module, kernels, rows) if graph_devices(module) <= {"cpu"} else (module, [])


class CompiledModule(torch.nn.Module):
    """A rewritten model. Call it with the same positional inputs as the original; it returns the
    same output structure.

    ``report`` holds the per-pass figures, ``pipeline`` the pipeline text, ``example_inputs`` the
    inputs it was compiled with. ``save(dir)`` writes an artifact for ``bevel.load``;
    ``export_onnx(path)`` writes an ONNX model. After ``layer_skip.early_exit`` the graph runs block
    by block, samples that exited leaving the batch, and ``early_exit`` counts their depths
    (:class:`~bevel.runtime.early_exit.EarlyExitState`); otherwise it is None. On the CPU its
    float32 linears run on the library measured faster for their shape (:mod:`bevel.codegen.cpu_linear`);
    ``cpu_linears`` lists the choices (``cpu_linear_kernels`` gives them instead, as a loaded
    artifact does). ``.to(device)`` moves it, graph and runners; its dtype stays the captured one.
    """

    _runs_early_exit_here = True  # a compiled decoder runs its own step graphs instead

    def __init__(self, graph_module: fx.GraphModule, example_inputs: tuple[Any, ...], report: Report,
                 pipeline: str, cpu_linear_kernels: dict[tuple[int, int, int], str] | None = None) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.example_inputs = tuple(example_inputs)
        self.report = report
        self.pipeline = pipeline
        self.early_exit = None
        self._exit_runner = None
        self.cpu_linears: list[ShapeChoice] = []
        # the kernel of each linear shape once chosen (None: time them), reused when the weights come back
        # to the CPU after a move
        self._cpu_linear_kernels = cpu_linear_kernels
        # what forward runs: the graph itself, or on the CPU a copy sharing its weights whose linears run
        # on the faster library (kept out of the submodules, so that state_dict and .to() see one copy)
        object.__setattr__(self, "_runner", graph_module)
        if self._runs_early_exit_here:
            from bevel.runtime.early_exit import early_exit_state, has_early_exit

            if has_early_exit(graph_module):
                self.early_exit = early_exit_state(graph_module)
            self._build_runners()

    def _build_runners(self) -> None:
        """Make what forward runs for the weights where they are now (:func:`on_cpu`): the graph, or
        after ``layer_skip.early_exit`` a runner in which samples that exited skip the blocks after
        their exit (same outputs as the graph)."""
        from bevel.runtime.compiled_decoder import runtime_graph
        from bevel.runtime.early_exit import EarlyExitRunner

        if self.early_exit is not None:
            runner, self.cpu_linears = on_cpu(runtime_graph(self.graph_module, 0), self._cpu_linear_kernels)
            self._exit_runner = EarlyExitRunner(runner, self.early_exit, decode=False)
        else:
            runner, self.cpu_linears = on_cpu(self.graph_module, self._cpu_linear_kernels)
            object.__setattr__(self, "_runner", runner)
        self._keep_kernels()

    def _keep_kernels(self) -> None:
        """Remember the kernels chosen, for when the weights come back to the CPU."""
        if self.cpu_linears:
            self._cpu_linear_kernels = {c.key: c.kernel for c in self.cpu_linears}

    def _apply(self, fn: Any, recurse: bool = True) -> CompiledModule:
        """What ``.to()``, ``.cuda()``, ``.cpu()``, ``.half()`` and the like call: the weights may move
        to another device, where the graph then makes its tensors and runs (with the CPU linear choice
        only on the CPU); a change of dtype is a BevelError and leaves the module as it was, since the
        captured graph keeps its casts and constants in the dtype it was captured in."""
        from bevel.codegen.lower import retarget_devices

        tensors = list(self.graph_module.parameters()) + list(self.graph_module.buffers())
        floating = [t for t in tensors if t.is_floating_point()]
        wanted = fn(floating[0]).dtype if floating else None
        if floating and wanted != floating[0].dtype:
            raise BevelError(f"the compiled {self.report.model if self.report else 'model'} computes in "
                             f"{str(floating[0].dtype).replace('torch.', '')}, the dtype it was captured in, and "
                             f"cannot be converted to {str(wanted).replace('torch.', '')} (its graph keeps that "
                             f"dtype's casts and constants): convert the model before bevel.compile instead")
        before = tensors[0].device if tensors else None
        super()._apply(fn, recurse)
        after = next(iter(list(self.graph_module.parameters()) + list(self.graph_module.buffers())), None)
        if after is not None and after.device != before:
            retarget_devices(self.graph_module, after.device)
            self._build_runners()
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the compiled graph on ``args`` (the original model's positional inputs), without
        gradients. Inputs it cannot take (their number, a tensor's rank, dtype or a fixed size, or
        keyword arguments) are a BevelError naming the input and what the graph expects."""
        if kwargs:
            names = ", ".join(spec["name"] for spec in self.input_specs)
            raise BevelError(f"the compiled {self.report.model} takes its inputs by position, as it was captured "
                             f"({names}); got keyword arguments {', '.join(kwargs)}")
        try:
            with torch.no_grad():
                if self._exit_runner is not None:
                    codegen = self.graph_module.graph._codegen  # the model's input and output structure
                    return codegen.process_outputs(self._exit_runner(*codegen.process_inputs(*args)))
                # traced by torch.compile, the graph itself: Inductor picks its own kernels, and it lowers
                # oneDNN's linear only for constant (frozen) weights
                return (self.graph_module if torch.compiler.is_compiling() else self._runner)(*args)
        except (AssertionError, AttributeError, RuntimeError, TypeError, ValueError) as error:
            # explained only after a failure, so that a good call pays nothing for the check
            problem = input_mismatch(self.input_specs, args)
            if problem is None:
                raise
            raise BevelError(f"the compiled {self.report.model} cannot take these inputs: {problem}") from error

    def cpu_graph_module(self) -> fx.GraphModule:
        """The graph with its weights and tensor-creating ops on the CPU, where saving and ONNX export
        work: the module itself when it already is there, else a moved copy (this one stays put)."""
        from bevel.codegen.lower import graph_devices, place

        if graph_devices(self.graph_module) <= {"cpu"}:
            return self.graph_module
        return place(self.graph_module, "cpu", copy_first=True)

    def cpu_example_inputs(self) -> tuple[Any, ...]:
        """The example inputs, tensors moved to the CPU."""
        return tuple(x.cpu() if isinstance(x, torch.Tensor) else x for x in self.example_inputs)

    @property
    def input_specs(self) -> list[dict[str, Any]]:
        """Name, dtype and shape of each input (symbolic dimensions by name)."""
        return input_specs(self.graph_module, self.example_inputs)

    def save(self, path: str) -> str:
        """Write an artifact directory (manifest, weights as safetensors, the program) to ``path``."""
        from bevel.runtime.artifact import save_artifact

        return save_artifact(self, path)

    def export_onnx(self, path: str, opset: int | None = None) -> str:
        """Write the compiled graph as ONNX to ``path`` with dynamic batch and sequence axes; returns the path.

        ``opset`` defaults to ``bevel.ir.onnx_export.DEFAULT_OPSET``."""
        from bevel.ir.onnx_export import DEFAULT_OPSET, export_onnx

        return export_onnx(self, path, opset=DEFAULT_OPSET if opset is None else opset)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Only a compiled causal LM generates; this one says so."""
        from bevel.ir.decoder import NotACausalLMError

        model = self.report.model if self.report else "a model"
        if model.endswith(("ForCausalLM", "LMHeadModel")):  # the class name is all a report keeps of it
            raise NotACausalLMError(f"generate() needs a compiled decoder; this {model} was compiled with "
                                    f"decoder=False, as its plain forward (tokens -> logits): compile it with "
                                    f"decoder=True (the default) to generate")
        raise NotACausalLMError(f"generate() needs a compiled causal language model; this one was compiled from "
                                f"{model}, which is not one (bevel captures HF '...ForCausalLM' / '...LMHeadModel' "
                                f"models as decoders)")

    def manifest_extra(self) -> dict[str, Any]:
        """Fields beyond the graph a saved artifact's manifest needs: the kernel each shape of linear
        runs on the CPU, where one was chosen (see :mod:`bevel.codegen.cpu_linear`)."""
        return {"cpu_linears": [[*c.key, c.kernel] for c in self.cpu_linears]} if self.cpu_linears else {}

    def extra_repr(self) -> str:
        return f"pipeline={self.pipeline!r}"
