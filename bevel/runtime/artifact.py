"""Artifacts: a compiled model saved as a directory, and ``bevel.load`` to run it again anywhere.

Layout of an artifact directory:
- ``manifest.json``: format version, bevel and torch versions, the pipeline, input specs, and the
  sha256 of every other file (checked on load, so a modified or truncated file is refused);
- ``weights.safetensors``: every weight of the compiled graph;
- ``program.pt2``: the graph itself, written by ``torch.export.save`` with its weights left out;
- ``example_inputs.safetensors``: the inputs it was compiled with (for re-export and checks);
- ``report.json``: the compile report.

The manifest also names the Python types of the model's input and output containers (a
``transformers`` ``ModelOutput``, say): ``load`` imports the module that defines each one so that
``torch.export.load`` can rebuild the output structure; the model's own class is never imported.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import logging
import os
import re
from typing import Any

import torch
import torch.utils._pytree as pytree
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bevel.compiler.report import Report
from bevel.errors import ArtifactError, first_line
from bevel.ir.attributes import owner_of, set_inference_flags, set_tensor
from bevel.ir.analysis import storage_key
from bevel.ir.capture import auto_dynamic_shapes, export_compiled
from bevel.runtime.compiled_module import CompiledModule

FORMAT = "bevel-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
PROGRAM = "program.pt2"
INPUTS = "example_inputs.safetensors"
REPORT = "report.json"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as error:
        raise ArtifactError(f"cannot read '{path}': {error.strerror or error}") from error
    return digest.hexdigest()


def _split_shared(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to store once each, and ``alias -> stored name`` for names that share one (tied weights)."""
    stored, aliases, by_key, storages = {}, {}, {}, set()
    for name, tensor in tensors.items():
        key = storage_key(tensor)
        if key in by_key:
            aliases[name] = by_key[key]
            continue
        by_key[key] = name
        value = tensor.detach().cpu().contiguous()
        # safetensors refuses tensors that share memory; copy only those (a copy of every weight
        # would double the memory a save needs)
        storage = value.untyped_storage()
        if storage.data_ptr() in storages or storage.nbytes() != value.numel() * value.element_size():
            value = value.clone()
        storages.add(value.untyped_storage().data_ptr())
        stored[name] = value
    return stored, aliases


# pytree containers that torch registers itself; any other type must be importable when loading
_BUILTIN_TYPE_MODULES = ("builtins", "collections", "torch")


def _container_types(program: torch.export.ExportedProgram) -> list[dict[str, str]]:
    """``{"type": serialized name, "module": defining module}`` of every non-builtin pytree node type
    in the program's input and output structure (e.g. a transformers ``ModelOutput``)."""
    found: dict[str, str] = {}

    def walk(spec: pytree.TreeSpec) -> None:
        typ = spec.type
        if typ is not None and typ.__module__.split(".")[0] not in _BUILTIN_TYPE_MODULES:
            node_def = pytree.SUPPORTED_SERIALIZED_TYPES.get(typ)
            name = node_def.serialized_type_name if node_def is not None else f"{typ.__module__}.{typ.__qualname__}"
            found.setdefault(name, typ.__module__)
        for child in spec.children():
            walk(child)

    for spec in (program.call_spec.in_spec, program.call_spec.out_spec):
        if spec is not None:
            walk(spec)
    return [{"type": name, "module": module} for name, module in found.items()]


def save_artifact(compiled: CompiledModule, path: str) -> str:
    """Write ``compiled`` to the directory ``path`` (created if missing); returns the path.

    Raises ArtifactError when ``path`` cannot be written or the compiled graph cannot be exported again.
    """
    import bevel

    path = _as_path(path, "CompiledModule.save")
    try:
        os.makedirs(path, exist_ok=True)
        # a save that fails half-way must not leave an old manifest describing files it overwrote
        if os.path.exists(os.path.join(path, MANIFEST)):
            os.remove(os.path.join(path, MANIFEST))
    except OSError as error:
        raise ArtifactError(f"cannot write an artifact to '{path}': {error.strerror or error}") from error
    module = compiled.cpu_graph_module()
    example_inputs = compiled.cpu_example_inputs()
    for i, x in enumerate(example_inputs):
        if not isinstance(x, (torch.Tensor, bool, int, float, str, type(None))):
            raise ArtifactError(f"cannot save example input {i} ({type(x).__name__}): an artifact stores tensor "
                                f"inputs and plain numbers, strings or None")
    try:
        program = export_compiled(module, example_inputs, auto_dynamic_shapes(example_inputs))
    except Exception as error:  # torch.export fails with many exception types; each becomes one clear error
        raise ArtifactError(f"cannot save the artifact '{path}': re-exporting the compiled graph with "
                            f"torch.export failed: {type(error).__name__}: {first_line(error)[:300]}") from error
    tensors = _program_tensors(program)
    stored, aliases = _split_shared(tensors)
    # requires_grad decides which kernel some ops take (matmul folding), so it is restored exactly
    frozen = sorted(name for name, t in program.state_dict.items()
                    if isinstance(t, torch.nn.Parameter) and not t.requires_grad)
    temporary = os.path.join(path, MANIFEST + ".tmp")
    try:
        save_file(stored, os.path.join(path, WEIGHTS))
        # the program keeps only the shapes of its weights; the values live in weights.safetensors
        program._state_dict = {k: _to_meta(v) for k, v in program.state_dict.items()}
        program._constants = {k: _to_meta(v) if isinstance(v, torch.Tensor) else v
                              for k, v in program.constants.items()}
        # written through memory: torch's zip writer, failing on a full disk, aborts the process
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        _write_bytes(os.path.join(path, PROGRAM), buffer.getbuffer())
        save_file({f"input_{i}": x.contiguous() for i, x in enumerate(example_inputs)
                   if isinstance(x, torch.Tensor)}, os.path.join(path, INPUTS))
        compiled.report.save_json(os.path.join(path, REPORT))
        # safetensors writes its files readable by their owner only; they get the mode the others got
        # (the umask's), so that whoever may read the artifact may load it
        mode = os.stat(os.path.join(path, REPORT)).st_mode & 0o777
        for name in (WEIGHTS, INPUTS):
            os.chmod(os.path.join(path, name), mode)
        files = [WEIGHTS, PROGRAM, INPUTS, REPORT]
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "bevel_version": bevel.__version__,
                    "torch_version": torch.__version__, "pipeline": compiled.pipeline,
                    "inputs": compiled.input_specs, "aliases": aliases, "frozen": frozen,
                    "container_types": _container_types(program),
                    "non_tensor_inputs": {str(i): x for i, x in enumerate(example_inputs)
                                          if not isinstance(x, torch.Tensor)},
                    "files": {name: _sha256(os.path.join(path, name)) for name in files},
                    **compiled.manifest_extra()}
        # the manifest is written last and atomically: its presence means the artifact is complete
        with open(temporary, "w") as f:
            json.dump(manifest, f, indent=2)
        os.replace(temporary, os.path.join(path, MANIFEST))
    except (OSError, SafetensorError) as error:  # a full disk fails safetensors' writer with its own error
        if os.path.exists(temporary):
            os.remove(temporary)
        detail = f"{error.strerror or error} ({error.filename or path})" if isinstance(error, OSError) else str(error)
        raise ArtifactError(f"cannot write the artifact '{path}': {detail}") from error
    return path


def _write_bytes(path: str, data: Any) -> None:
    """Write ``data`` to ``path``; an OSError names the file (a failed write alone does not)."""
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as error:
        raise OSError(error.errno, error.strerror, path) from error


def _to_meta(t: torch.Tensor) -> torch.Tensor:
    meta = t.detach().to("meta")
    return torch.nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else meta


_FILE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _read_manifest(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise ArtifactError(f"no artifact at '{path}': the path does not exist")
    if not os.path.isdir(path):
        raise ArtifactError(f"'{path}' is not an artifact: an artifact is a directory written by "
                            f"CompiledModule.save")
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise ArtifactError(f"artifact '{path}' is incomplete: {MANIFEST} is missing")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{MANIFEST} in '{path}' is not valid JSON ({error}); the artifact is corrupt") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{MANIFEST} in '{path}' is not a bevel artifact manifest "
                            f"(expected \"format\": \"{FORMAT}\")")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArtifactError(f"{MANIFEST} in '{path}' has no valid format_version (got {version!r})")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"artifact '{path}' has format version {version}, written by a newer bevel "
                            f"({manifest.get('bevel_version', 'unknown')}); this bevel "
                            f"({_bevel_version()}) reads version {FORMAT_VERSION}: upgrade bevel to load it")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"artifact '{path}' has format version {version}; this bevel reads version "
                            f"{FORMAT_VERSION}: save the model again with this bevel")
    _check_manifest_fields(manifest, path)
    return manifest


def _bevel_version() -> str:
    import bevel

    return bevel.__version__


def _check_manifest_fields(manifest: dict[str, Any], path: str) -> None:
    """Refuse a manifest whose fields, or the values inside them, have the wrong types, with the field named."""
    def bad(field: str, expected: str, got: Any) -> ArtifactError:
        return ArtifactError(f"{MANIFEST} in '{path}' is invalid: \"{field}\" must be {expected}, got {got!r:.80}")

    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise bad("files", "an object mapping file names to sha256 digests", files)
    for name in files:
        if not _FILE_NAME.match(name) or name in (".", ".."):
            raise ArtifactError(f"{MANIFEST} in '{path}' is invalid: it lists '{name}', which is not a plain "
                                f"file name inside the artifact")
    inputs = manifest.get("inputs", [])
    if not isinstance(inputs, list) or not all(isinstance(spec, dict) for spec in inputs):
        raise bad("inputs", "a list of input specs (objects)", inputs)
    if not isinstance(manifest.get("pipeline", ""), str):
        raise bad("pipeline", "a string", manifest.get("pipeline"))
    aliases = manifest.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise bad("aliases", "an object mapping weight names to the names they are stored under", aliases)
    frozen = manifest.get("frozen", [])
    if not isinstance(frozen, list) or not all(isinstance(name, str) for name in frozen):
        raise bad("frozen", "a list of parameter names", frozen)
    non_tensor = manifest.get("non_tensor_inputs", {})
    if not isinstance(non_tensor, dict) or not all(isinstance(v, (bool, int, float, str, type(None)))
                                                   for v in non_tensor.values()):
        raise bad("non_tensor_inputs", "an object mapping input positions to numbers, strings, booleans "
                                       "or null", non_tensor)
    types = manifest.get("container_types", [])
    if not isinstance(types, list) or not all(isinstance(t, dict) and isinstance(t.get("type"), str)
                                              and isinstance(t.get("module"), str) for t in types):
        raise bad("container_types", "a list of {\"type\", \"module\"} objects", types)
    linears = manifest.get("cpu_linears", [])
    if not isinstance(linears, list) or not all(
            isinstance(e, list) and len(e) == 4 and all(map(_is_int, e[:3])) and e[3] in ("aten", "onednn")
            for e in linears):
        raise bad("cpu_linears", "a list of [rows, inputs, outputs, \"aten\" or \"onednn\"]", linears)
    decoder = manifest.get("decoder", {})
    if not isinstance(decoder, dict):
        raise bad("decoder", "an object (a decoder spec)", decoder)
    # DecoderSpec.from_json checks no types: a wrong one would fail only later, inside generate
    for key in _DECODER_INTEGERS:
        if key in decoder and not _is_int(decoder[key]):
            raise bad(f"decoder.{key}", "an integer", decoder[key])
    if decoder.get("max_positions") is not None and not _is_int(decoder["max_positions"]):
        raise bad("decoder.max_positions", "an integer or null", decoder["max_positions"])
    eos = decoder.get("eos_token_id")
    if eos is not None and not _is_int(eos) and not (isinstance(eos, list) and eos and all(map(_is_int, eos))):
        raise bad("decoder.eos_token_id", "an integer, a list of integers or null", eos)
    dtype = decoder.get("cache_dtype", "float32")
    if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise bad("decoder.cache_dtype", "the name of a torch dtype, such as \"float32\"", dtype)
    heads = decoder.get("kv_heads")
    if heads is not None and not (isinstance(heads, list) and len(heads) == decoder.get("num_layers")
                                  and all(_is_int(h) and h >= 1 for h in heads)):
        raise bad("decoder.kv_heads", "null or a list of positive integers, one per layer", heads)
    windows = decoder.get("native_windows")
    if windows is not None and not (isinstance(windows, list) and len(windows) == decoder.get("num_layers")
                                    and all(_is_int(w) and w >= 0 for w in windows)):
        raise bad("decoder.native_windows", "null or a list of integers >= 0 (0: no window), one per layer", windows)
    policy = decoder.get("cache_policy", {})
    # kv.evict records its budget and recent share as fractions of the cache where given so
    if not isinstance(policy, dict) or not all(v is None or _is_number(v) for v in policy.values()):
        raise bad("decoder.cache_policy", "an object of numbers or nulls", policy)


_DECODER_INTEGERS = ("num_layers", "num_kv_heads", "head_dim", "vocab_size", "max_cache_len", "pad_token_id")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def verify_artifact(path: str) -> dict[str, Any]:
    """Check that every file the manifest lists is present and unmodified; returns the manifest."""
    manifest = _read_manifest(path)
    files = manifest.get("files", {})
    for required in (WEIGHTS, PROGRAM, INPUTS, REPORT):
        if required not in files:
            raise ArtifactError(f"{MANIFEST} in '{path}' does not list {required}; the artifact is incomplete")
    for name, digest in files.items():
        file_path = os.path.join(path, name)
        if not os.path.isfile(file_path):
            raise ArtifactError(f"artifact '{path}' is incomplete: {name} is missing")
        if _sha256(file_path) != digest:
            raise ArtifactError(f"{name} in '{path}' does not match its sha256 in {MANIFEST}: "
                                f"the file was modified or corrupted")
    return manifest


def _assign(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Put a loaded weight in place of the program's empty one, keeping the kind of attribute it was."""
    owner, leaf = owner_of(module, name)
    if isinstance(value, torch.nn.Parameter) or isinstance(getattr(owner, leaf, None), torch.nn.Parameter):
        set_tensor(module, name, value, as_parameter=True)
    elif leaf in owner._buffers:
        # not set_tensor: it would register the buffer again as persistent, and a non-persistent
        # buffer (one torch.export keeps among the constants) would move to the state dict
        owner._buffers[leaf] = value
    else:
        setattr(owner, leaf, value)  # a tensor constant of the program stays a plain attribute


def _import_container_types(manifest: dict[str, Any], path: str) -> None:
    """Import the modules that register the program's input/output container types with pytree
    (``transformers.modeling_outputs`` for a BERT's output), so ``torch.export.load`` can rebuild them."""
    for entry in manifest.get("container_types", []):
        name, module = entry["type"], entry["module"]
        if name in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            continue
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", module):
            raise ArtifactError(f"{MANIFEST} in '{path}' is invalid: '{module}' is not a module name")
        try:
            importlib.import_module(module)
        except Exception as error:  # ImportError, or whatever the module raises while importing
            raise ArtifactError(f"the model in '{path}' returns (or takes) a {name}; loading it needs the module "
                                f"'{module}', which cannot be imported here ({type(error).__name__}: {error}); "
                                f"install the package that provides it") from error
        if name not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            raise ArtifactError(f"the model in '{path}' returns (or takes) a {name}, which importing '{module}' "
                                f"does not register with torch.utils._pytree; register it "
                                f"(torch.export.register_dataclass or register_pytree_node) before bevel.load")


def _aligned(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors in memory of their own, aligned as torch allocates it (64 bytes).

    safetensors hands out tensors at the file's offsets; CPU kernels vectorize differently on
    unaligned data (a Linear with one output differs in the last bit), and the loaded model must
    reproduce the saved one exactly.
    """
    return {name: t if t.data_ptr() % 64 == 0 else t.clone() for name, t in tensors.items()}


def _program_tensors(program: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """Every tensor the program holds by name: its weights and buffers, and its tensor constants."""
    return {**program.state_dict, **{k: v for k, v in program.constants.items() if isinstance(v, torch.Tensor)}}


def _check_weights(weights: dict[str, torch.Tensor], program: torch.export.ExportedProgram, path: str) -> None:
    """Every weight the program declares is in the file, with the declared shape and dtype."""
    declared = _program_tensors(program)
    missing = [name for name in declared if name not in weights]
    if missing:
        raise ArtifactError(f"{WEIGHTS} in '{path}' lacks weights the program needs: {', '.join(missing[:5])}"
                            f"{' ...' if len(missing) > 5 else ''}")
    for name, spec in declared.items():
        value = weights[name]
        if tuple(value.shape) != tuple(spec.shape) or value.dtype != spec.dtype:
            raise ArtifactError(f"{WEIGHTS} in '{path}' holds '{name}' as {value.dtype} {tuple(value.shape)} but "
                                f"{PROGRAM} expects {spec.dtype} {tuple(spec.shape)}")


def load(path: str) -> CompiledModule:
    """Load an artifact written by ``CompiledModule.save``; the model's Python class is not needed.

    Raises ArtifactError naming the file when the artifact is incomplete, modified or corrupt, and
    when ``path`` is not a path at all.
    """
    path = _as_path(path, "bevel.load")
    manifest = verify_artifact(path)
    _import_container_types(manifest, path)
    reading = WEIGHTS
    try:
        weights = _aligned(load_file(os.path.join(path, WEIGHTS)))
        reading = INPUTS
        inputs = load_file(os.path.join(path, INPUTS))
        reading = PROGRAM
        program = _load_program(os.path.join(path, PROGRAM))
        reading = REPORT
        with open(os.path.join(path, REPORT)) as f:
            report = Report.from_json(json.load(f))
    except ArtifactError:
        raise
    except Exception as error:  # a file that passed its checksum but cannot be read was written badly
        raise ArtifactError(f"{reading} in '{path}' could not be read: {type(error).__name__}: "
                            f"{first_line(error)[:300]}") from error
    for name, stored in manifest.get("aliases", {}).items():
        if stored not in weights:
            raise ArtifactError(f"{MANIFEST} in '{path}' ties '{name}' to '{stored}', which {WEIGHTS} lacks")
        weights[name] = weights[stored]
    _check_weights(weights, program, path)
    frozen = set(manifest.get("frozen", []))
    # one Parameter per stored tensor, so names that were tied stay tied to the same object
    parameters: dict[int, torch.nn.Parameter] = {}
    for name in program.state_dict:
        if isinstance(program.state_dict[name], torch.nn.Parameter):
            value = weights[name]
            if id(value) not in parameters:
                parameters[id(value)] = torch.nn.Parameter(value, requires_grad=name not in frozen)
            weights[name] = parameters[id(value)]
    module = program.module()
    for name, value in weights.items():
        try:
            _assign(module, name, value)
        except KeyError:
            raise ArtifactError(f"{WEIGHTS} in '{path}' holds '{name}', which {PROGRAM} has no place for") from None
    missing = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if missing:
        raise ArtifactError(f"{WEIGHTS} in '{path}' lacks weights the program needs: {', '.join(missing[:5])}")
    set_inference_flags(module)
    count = len(manifest.get("inputs", []))
    non_tensor = manifest.get("non_tensor_inputs", {})
    try:
        example_inputs = tuple(inputs[f"input_{i}"] if f"input_{i}" in inputs else non_tensor[str(i)]
                               for i in range(count))
    except KeyError as error:
        raise ArtifactError(f"{INPUTS} in '{path}' lacks example input {error}") from None
    # the kernel each shape of linear ran on the CPU when saved, so that the loaded module computes the same
    kernels = {tuple(entry[:3]): entry[3] for entry in manifest.get("cpu_linears", [])}
    if "decoder" in manifest:
        from bevel.ir.decoder import DecoderSpec
        from bevel.runtime.compiled_decoder import CompiledDecoder

        try:
            spec = DecoderSpec.from_json(manifest["decoder"])
        except (TypeError, KeyError) as error:
            raise ArtifactError(f"{MANIFEST} in '{path}' is invalid: \"decoder\" is not a decoder spec "
                                f"({error})") from None
        return CompiledDecoder(module, example_inputs, report, manifest.get("pipeline", ""), spec, kernels)
    return CompiledModule(module, example_inputs, report, manifest.get("pipeline", ""), kernels)


class _ErrorRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])


def _load_program(file: str) -> torch.export.ExportedProgram:
    """``torch.export.load``, raising the deserializer's own error (torch logs it and raises a vague one)."""
    records = _ErrorRecords()
    logger = logging.getLogger("torch.export")
    logger.addHandler(records)
    try:
        return torch.export.load(file)
    except Exception as error:
        if records.errors:
            raise records.errors[-1] from error
        raise
    finally:
        logger.removeHandler(records)


def _as_path(path: Any, caller: str) -> str:
    """``path`` as a str path; an ArtifactError when it is not a path at all (``bevel.load(123)``)."""
    try:
        return os.fsdecode(os.fspath(path))
    except TypeError:
        raise ArtifactError(f"{caller} takes the path of an artifact directory (a str or os.PathLike), "
                            f"got {type(path).__name__}") from None
