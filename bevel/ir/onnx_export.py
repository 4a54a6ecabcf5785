"""The ONNX bridge: write a compiled graph as ONNX with dynamic batch and sequence axes, checked by onnx.checker.

Exactly the input dimensions that are symbolic in the compiled graph are dynamic in the ONNX model
(a Linear's feature dimension stays fixed); they are named ``batch`` (dimension 0), ``sequence``
(dimension 1 of a 2-D or 3-D input) or ``<input>_dim<i>``; dimensions that share a symbol share a name.
"""

from __future__ import annotations

import copy
import os
import re
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_flatten_with_path

from bevel.errors import ExportError
from bevel.ir.graph import MADE_BY
from bevel.ir.printer import output_path

if TYPE_CHECKING:
    from bevel.runtime.compiled_module import CompiledModule

# The one place the ONNX opset is chosen: the oldest bevel writes and the default everywhere.
DEFAULT_OPSET = 18


def output_names(module: torch.nn.Module, args: tuple[Any, ...]) -> list[str]:
    """Names for the ONNX outputs from the output structure: ``last_hidden_state``, ``output_0``, ..."""
    with torch.no_grad():
        outputs = module(*args)
    names = []
    for i, (path, _) in enumerate(tree_flatten_with_path(outputs)[0]):
        name = re.sub(r"[^0-9A-Za-z_]+", "_", output_path(path)).strip("_")
        names.append(name if name and not name[0].isdigit() else f"output_{name or i}")
    return names


def dynamic_axes(compiled: "CompiledModule") -> tuple[dict[int, str] | None, ...]:
    """For each input, ``{dimension: name}`` of the dimensions the compiled graph leaves symbolic."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    axes: list[dict[int, str] | None] = []
    for spec in compiled.input_specs:
        shape = spec["shape"]
        if shape is None:
            axes.append(None)
            continue
        found = {}
        for dim, size in enumerate(shape):
            if isinstance(size, int):  # fixed; symbolic sizes are given by their symbol's name
                continue
            if size not in names:
                name = "batch" if dim == 0 else "sequence" if dim == 1 and len(shape) in (2, 3) else ""
                if not name or name in taken:
                    name = f"{spec['name']}_{name or f'dim{dim}'}"
                names[size] = name
                taken.add(name)
            found[dim] = names[size]
        axes.append(found or None)
    return tuple(axes)


def _export_dynamic_shapes(axes: tuple[dict[int, str] | None, ...]) -> tuple[dict[int, Any] | None, ...]:
    """``dynamic_axes`` as torch.onnx wants them: a name renames a dimension, so each name is given once
    and the other dimensions that share it are plainly dynamic (they share the graph's symbol already)."""
    seen: set[str] = set()
    converted: list[dict[int, Any] | None] = []
    for dims in axes:
        if dims is None:
            converted.append(None)
            continue
        converted.append({dim: torch.export.Dim.DYNAMIC if name in seen else name for dim, name in dims.items()})
        seen.update(dims.values())
    return tuple(converted)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _type_advice(message: str, opset: int) -> str:
    """For a checker failure on an op that has no form for a tensor type at ``opset`` (a bfloat16
    Conv before opset 22), the first opset that has one, and what else to do; else nothing. (A newer
    opset is no sure way out: onnxruntime's CPU provider runs no bfloat16 Conv at opset 22.)"""
    import onnx

    found = re.search(r"op_type:(\w+).*unsupported type: (tensor\(\w+\))", message, re.S)
    if found is None:
        return ""
    op, dtype = found.groups()
    later = ""
    for version in range(opset + 1, onnx.defs.onnx_opset_version() + 1):
        try:
            schema = onnx.defs.get_schema(op, version)
        except onnx.defs.SchemaError:
            break  # the op left the standard
        if any(dtype in c.allowed_type_strs for c in schema.type_constraints):
            later = f"opset={schema.since_version} has one, though a runtime may lack its kernel; "
            break
    return f". {op} has no {dtype[7:-1]} form in ONNX opset {opset}: {later}compile the model in float32 to export it"


def _describe(error: BaseException) -> str:
    """``Type: first line`` of the error, and of its root cause when it has one (the exporter wraps
    the real failure in a generic "Failed to export" error)."""
    def line(e: BaseException) -> str:
        text = _ANSI.sub("", str(e)).strip()
        return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"

    root = error
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    return line(error) if root is error else f"{line(error)} (caused by {line(root)})"


def _file_path(path: Any) -> str:
    """``path`` as a str path; an ExportError when it is not a path at all (None, a number)."""
    try:
        return os.fsdecode(os.fspath(path))
    except TypeError:
        raise ExportError(f"export_onnx takes the path of the file to write (a str or os.PathLike), got "
                          f"{type(path).__name__}") from None


def _check_writable(path: str) -> str:
    """The absolute path, after making sure its folder exists (created if missing) and takes new files."""
    target = os.path.abspath(path)
    if os.path.isdir(target):
        raise ExportError(f"cannot write the ONNX model to '{path}': it is a directory; give a file path "
                          f"such as '{os.path.join(path, 'model.onnx')}'")
    directory = os.path.dirname(target)
    parent = directory
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent) if os.path.dirname(parent) != parent else ""
    if parent and not os.path.isdir(parent):
        raise ExportError(f"cannot write the ONNX model to '{path}': '{parent}' is a file, not a folder")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        raise ExportError(f"cannot write the ONNX model to '{path}': its folder '{directory}' cannot be "
                          f"created ({error.strerror or error})") from error
    if not os.access(directory, os.W_OK):
        raise ExportError(f"cannot write the ONNX model to '{path}': the folder '{directory}' is not writable")
    try:  # os.access says yes to root everywhere; a real write says no on read-only mounts and in /proc
        with open(target, "ab"):
            pass
    except OSError as error:
        raise ExportError(f"cannot write the ONNX model to '{path}': {error.strerror or error}") from error
    return target


# Per-node metadata the exporter writes for debugging: the Python stack trace (with the source paths
# of the machine that exported) and the fx node's text; about 0.7 MB for MiniLM. Scopes and class
# names stay.
_DEBUG_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")


def _tidy(path: str, axes: list[dict[int, str] | None]) -> None:
    """Remove :data:`_DEBUG_METADATA` from every node of the file and give the graph inputs' symbolic
    dimensions the names of ``axes`` (one per ONNX input, from :func:`dynamic_axes`); the weights in
    ``.data`` are untouched. torch.onnx names them itself, except where a None input stands between
    tensor inputs: it counts the None and gives up."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    for node in model.graph.node:
        kept = [p for p in node.metadata_props if p.key not in _DEBUG_METADATA]
        if len(kept) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
    renames: dict[str, str] = {}
    for value, dims in zip(model.graph.input, axes):
        for dim, name in (dims or {}).items():
            old = value.type.tensor_type.shape.dim[dim].dim_param
            if old and old != name:
                renames.setdefault(old, name)
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in renames:
                dim.dim_param = renames[dim.dim_param]
    onnx.save(model, path)


def check_opset(opset: int) -> None:
    """Raise ExportError unless ``opset`` is an ONNX opset version bevel can write: from
    :data:`DEFAULT_OPSET` to the newest the installed onnx package knows."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise ExportError(f"opset={opset!r} is not an ONNX opset version: give an integer from {DEFAULT_OPSET} to "
                          f"{newest}")
    if opset < DEFAULT_OPSET:
        raise ExportError(f"opset={opset} is too old: bevel writes ONNX opset {DEFAULT_OPSET} or newer")
    if opset > newest:
        raise ExportError(f"opset={opset} is newer than the installed onnx package knows (up to {newest})")


def _check_translations(module: torch.fx.GraphModule, translations: dict[Any, Any]) -> None:
    """Raise ExportError naming the first bevel op of ``module`` that has no ONNX translation (what
    a pass made for the torch runtime only, such as ``unpad``'s packing), before the exporter runs."""
    for node in module.graph.nodes:
        target = node.target
        if node.op == "call_function" and getattr(target, "namespace", None) == "bevel" and target not in translations:
            made_by = node.meta.get(MADE_BY)
            raise ExportError(f"cannot export to ONNX: node '{node.name}' is {target.name()}, which has no ONNX form; "
                              + (f"`{made_by}` put it there: compile without it to export this model" if made_by
                                 else "compile without the pass that put it there to export this model"))


def _layouts_copied(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``module`` with every ``contiguous`` written as a clone into contiguous memory, and a clone put
    between a transpose or permute and a reshape of it (a new graph on the same weights; the module
    itself where there is nothing to change). In ONNX a clone is nothing.

    The exporter traces the graph again and then decomposes it, and the fake strides of
    ``scaled_dot_product_attention`` differ between those steps. It drops a ``contiguous`` whose
    input looks contiguous already, and turns a ``reshape`` whose input looks contiguous into a
    view: on T5's ``transpose(1, 2).contiguous().view(...)`` after attention, and on the
    ``transpose(1, 2).reshape(...)`` after an attention ``fuse_attention`` made (timm's Swin), the
    decomposition step could then not view the transposed attention output, and the export failed.
    A clone is never dropped, and a reshape of a clone is always a view.
    """
    aten = torch.ops.aten
    moves, reshapes = (aten.transpose.int, aten.permute.default), (aten.view.default, aten.reshape.default)

    def moved(node: torch.fx.Node) -> bool:
        return isinstance(node.args[0], torch.fx.Node) and node.args[0].target in moves

    if not any(node.target == aten.contiguous.default or (node.target in reshapes and moved(node))
               for node in module.graph.nodes):
        return module
    graph = copy.deepcopy(module.graph)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target == aten.contiguous.default:
            memory_format = node.kwargs.get("memory_format", node.args[1] if len(node.args) > 1 else None)
            node.target = aten.clone.default
            node.args = node.args[:1]
            node.kwargs = {"memory_format": memory_format or torch.contiguous_format}
        elif node.op == "call_function" and node.target in reshapes and moved(node):
            with graph.inserting_before(node):
                clone = graph.call_function(aten.clone.default, (node.args[0],),
                                            {"memory_format": torch.contiguous_format})
            node.replace_input_with(node.args[0], clone)
    return torch.fx.GraphModule(module, graph)


def export_onnx(compiled: "CompiledModule", path: str, opset: int = DEFAULT_OPSET) -> str:
    """Write ``compiled`` as ONNX to ``path`` through ``torch.onnx.export(dynamo=True)``.

    The input dimensions that the compiled graph leaves symbolic (batch, sequence) are dynamic in
    the ONNX model (see the module docstring for their names); the weights go to ``<path>.data``
    beside it. bevel's custom ops are written with their registered onnxscript translations.
    Raises ExportError for an opset outside what :func:`check_opset` allows, a bevel op without an
    ONNX translation, a path that cannot be written, an input that is a dict, list or tuple, or a graph
    the exporter or onnx.checker refuses.
    """
    import onnx

    from bevel.runtime.ops import onnx_translations

    translations = onnx_translations()
    check_opset(opset)
    path = _file_path(path)
    nested = [i for i, x in enumerate(compiled.example_inputs) if isinstance(x, (dict, list, tuple))]
    if nested:
        x = compiled.example_inputs[nested[0]]
        raise ExportError(f"cannot export to ONNX: input {nested[0]} is a {type(x).__name__} of tensors, and the "
                          f"ONNX export takes tensors (or None) as the model's positional inputs; wrap the model "
                          f"in a module that takes the tensors one by one")
    module = _layouts_copied(compiled.cpu_graph_module())
    _check_translations(module, translations)
    existed = os.path.exists(path)
    target = _check_writable(path)
    args = compiled.cpu_example_inputs()
    axes = dynamic_axes(compiled)
    # only tensors become ONNX inputs: a None or a number is not one, and naming it would shift every
    # later name onto the wrong input
    tensors = [(spec["name"], dims) for spec, dims in zip(compiled.input_specs, axes) if spec["shape"] is not None]
    try:
        torch.onnx.export(module, args, target, dynamo=True,
                          dynamic_shapes=_export_dynamic_shapes(axes),
                          input_names=[name for name, _ in tensors],
                          output_names=output_names(module, args), opset_version=opset,
                          custom_translation_table=dict(translations) or None, verbose=False)
    except Exception as error:  # the exporter raises many types; report one clear error
        if not existed and os.path.isfile(target) and os.path.getsize(target) == 0:
            os.remove(target)  # the empty file the writability check left
        raise ExportError(f"could not export the compiled graph to ONNX at '{path}': {_describe(error)}") from error
    _tidy(target, [dims for _, dims in tensors])
    written = {entry.domain: entry.version for entry in onnx.load(target, load_external_data=False).opset_import}
    if written.get("", written.get("ai.onnx")) != opset:
        # the exporter writes opset 18 and converts; where an op has no converter it keeps 18 and only warns
        raise ExportError(f"could not write ONNX opset {opset} at '{path}': the exporter could not convert every op "
                          f"from opset {DEFAULT_OPSET} (see its warning above); opset {DEFAULT_OPSET} works")
    try:
        onnx.checker.check_model(target, full_check=True)
    except Exception as error:
        raise ExportError(f"the ONNX model written to '{path}' fails onnx.checker: {error}"
                          f"{_type_advice(str(error), opset)}") from error
    return path
