"""Artifacts: a compiled model saved as a directory, and ``bevel.load`` to run it again anywhere.

Layout of an artifact directory:
- ``manifest.json``: format version, bevel and torch versions, the pipeline, input specs, and the
  sha256 of every other file (checked on load, so a modified or truncated file is refused);
- ``weights.safetensors``: every weight of the compiled graph;
- ``program.pt2``: the graph itself, written by ``torch.export.save`` with its weights left out;
- ``example_inputs.safetensors``: the inputs it was compiled with (for re-export and checks);
- ``report.json``: the compile report.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from bevel.compiler.report import Report
from bevel.errors import ArtifactError
from bevel.ir.capture import auto_dynamic_shapes
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
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _split_shared(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to store once each, and ``alias -> stored name`` for names that share one (tied weights)."""
    stored, aliases, by_key = {}, {}, {}
    for name, tensor in tensors.items():
        key = _storage_key(tensor)
        if key in by_key:
            aliases[name] = by_key[key]
        else:
            by_key[key] = name
            stored[name] = tensor.detach().cpu().contiguous().clone()
    return stored, aliases


def save_artifact(compiled: CompiledModule, path: str) -> str:
    """Write ``compiled`` to the directory ``path`` (created if missing); returns the path."""
    import bevel

    os.makedirs(path, exist_ok=True)
    module = compiled.graph_module.to("cpu")
    example_inputs = tuple(x.cpu() if isinstance(x, torch.Tensor) else x for x in compiled.example_inputs)
    program = torch.export.export(module, example_inputs, dynamic_shapes=auto_dynamic_shapes(example_inputs),
                                  strict=False)
    tensors = {**program.state_dict, **{k: v for k, v in program.constants.items() if isinstance(v, torch.Tensor)}}
    stored, aliases = _split_shared(tensors)
    save_file(stored, os.path.join(path, WEIGHTS))
    # the program keeps only the shapes of its weights; the values live in weights.safetensors
    program._state_dict = {k: _to_meta(v) for k, v in program.state_dict.items()}
    program._constants = {k: _to_meta(v) if isinstance(v, torch.Tensor) else v for k, v in program.constants.items()}
    torch.export.save(program, os.path.join(path, PROGRAM))
    save_file({f"input_{i}": x.contiguous() for i, x in enumerate(example_inputs) if isinstance(x, torch.Tensor)},
              os.path.join(path, INPUTS))
    compiled.report.save_json(os.path.join(path, REPORT))
    files = [WEIGHTS, PROGRAM, INPUTS, REPORT]
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "bevel_version": bevel.__version__,
                "torch_version": torch.__version__, "pipeline": compiled.pipeline,
                "inputs": compiled.input_specs, "aliases": aliases,
                "non_tensor_inputs": {str(i): x for i, x in enumerate(example_inputs)
                                      if not isinstance(x, torch.Tensor)},
                "files": {name: _sha256(os.path.join(path, name)) for name in files}}
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    return path


def _to_meta(t: torch.Tensor) -> torch.Tensor:
    meta = t.detach().to("meta")
    return torch.nn.Parameter(meta, requires_grad=False) if isinstance(t, torch.nn.Parameter) else meta


def _read_manifest(path: str) -> dict[str, Any]:
    if not os.path.isdir(path):
        raise ArtifactError(f"no artifact directory at '{path}'")
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise ArtifactError(f"artifact '{path}' is incomplete: {MANIFEST} is missing")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{MANIFEST} in '{path}' is not valid JSON ({error}); the artifact is corrupt") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{MANIFEST} in '{path}' is not a bevel artifact manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"artifact '{path}' has format version {manifest.get('format_version')}; this bevel "
                            f"reads version {FORMAT_VERSION}")
    return manifest


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
    *path, leaf = name.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part)
    old = getattr(owner, leaf, None)
    if isinstance(old, torch.nn.Parameter):
        owner.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        setattr(owner, leaf, value)


def load(path: str) -> CompiledModule:
    """Load an artifact written by ``CompiledModule.save``; the model's Python class is not needed.

    Raises ArtifactError naming the file when the artifact is incomplete, modified or corrupt.
    """
    manifest = verify_artifact(path)
    try:
        weights = load_file(os.path.join(path, WEIGHTS))
        inputs = load_file(os.path.join(path, INPUTS))
        program = torch.export.load(os.path.join(path, PROGRAM))
        with open(os.path.join(path, REPORT)) as f:
            report = Report.from_json(json.load(f))
    except ArtifactError:
        raise
    except Exception as error:  # a file that passed its checksum but cannot be read was written badly
        raise ArtifactError(f"artifact '{path}' could not be read: {type(error).__name__}: {error}") from error
    module = program.module()
    for name, stored in manifest.get("aliases", {}).items():
        weights[name] = weights[stored]
    for name, value in weights.items():
        _assign(module, name, value)
    missing = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if missing:
        raise ArtifactError(f"{WEIGHTS} in '{path}' lacks weights the program needs: {', '.join(missing[:5])}")
    for sub in module.modules():
        sub.training = False
    count = len(manifest.get("inputs", []))
    non_tensor = manifest.get("non_tensor_inputs", {})
    example_inputs = tuple(inputs[f"input_{i}"] if f"input_{i}" in inputs else non_tensor[str(i)]
                           for i in range(count))
    return CompiledModule(module, example_inputs, report, manifest.get("pipeline", ""))
