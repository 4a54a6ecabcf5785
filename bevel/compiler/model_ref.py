"""Resolve the CLI's MODEL, ``--calibration`` and ``--validation`` arguments: built-in names,
``package.module:callable`` references and ``.pt`` files, each failing with a ModelLoadError or
BevelError that says what to fix.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import os
import sys
import zipfile
from typing import Any, Iterator

import torch

from bevel.compiler.compile import calibration_batches
from bevel.errors import BevelError, ModelLoadError, first_line
from bevel.models import BUILTIN_MODELS

# The function a built-in model's module defines to give its own calibration batches.
BUILTIN_CALIBRATION = "calibration_batches"


def is_builtin(ref: str) -> bool:
    """Whether ``ref`` names a built-in model (``minilm``) rather than a ``package.module:callable``."""
    return ref in BUILTIN_MODELS


def resolve_model(ref: str, example_inputs: tuple[Any, ...] | None = None) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    """Load the model named by ``ref`` and its example inputs.

    ``ref`` is a built-in name (a key of ``bevel.models.BUILTIN_MODELS``) or ``package.module:callable``,
    imported with the current directory on the path. The callable takes no arguments and returns a
    module or a ``(module, example_inputs)`` pair; an ``nn.Module`` instance may also be named directly.
    ``example_inputs`` (e.g. the first calibration batch) serves when the callable returns only a module.
    Raises ModelLoadError naming ``ref`` and what to do.
    """
    target = BUILTIN_MODELS.get(ref, ref)
    obj = load_object(target, what=f"MODEL '{ref}'", error=ModelLoadError)
    if isinstance(obj, torch.nn.Module):
        result: Any = obj
    elif callable(obj):
        with _cwd_on_path():
            try:
                result = obj()
            except BevelError:
                raise
            # the user's builder may raise anything, or exit: report it as theirs
            except (Exception, SystemExit) as error:
                raise ModelLoadError(f"MODEL '{ref}': calling {target}() raised {type(error).__name__}: "
                                     f"{first_line(error)}; fix the callable so it runs without arguments") from error
    else:
        raise ModelLoadError(f"MODEL '{ref}': {target} is a {type(obj).__name__}, not a callable; name a function "
                             f"that returns (model, example_inputs)")
    return _model_and_inputs(ref, result, example_inputs)


def resolve_calibration(ref: str | None, model_ref: str) -> list[tuple[Any, ...]] | None:
    """The calibration batches named by ``--calibration``, as a list of input tuples (None: none given).

    ``ref`` is ``package.module:callable`` (returns an iterable of input tuples), a ``.pt`` file holding
    a list of input tuples, or ``builtin`` (the built-in model's own batches). With no ``ref``, a
    built-in model still gets its own batches, so ``bevel export minilm`` calibrates on real text.
    """
    if ref is None:
        return _builtin_calibration(model_ref) if is_builtin(model_ref) else None
    if not isinstance(ref, str) or not ref.strip():
        raise BevelError(f"--calibration {ref!r} is empty; give package.module:callable, a .pt file or 'builtin'")
    if ref == "builtin":
        if not is_builtin(model_ref):
            raise BevelError(f"--calibration builtin needs a built-in MODEL ({', '.join(sorted(BUILTIN_MODELS))}), "
                             f"not '{model_ref}'; give package.module:callable or a .pt file instead")
        return _builtin_calibration(model_ref)
    return _batches(ref, "--calibration", ", or 'builtin'")


def resolve_validation(ref: str | None) -> list[tuple[Any, ...]] | None:
    """The held-out batches named by ``--validation`` (None: none given): ``package.module:callable`` or
    a ``.pt`` file, as for ``--calibration``. A built-in model's own batches are its calibration
    batches, not held out, so ``builtin`` is refused."""
    if ref is None:
        return None
    if not isinstance(ref, str) or not ref.strip():
        raise BevelError(f"--validation {ref!r} is empty; give package.module:callable or a .pt file")
    if ref == "builtin":
        raise BevelError("--validation builtin: a built-in model's own batches are its calibration batches, not "
                         "held out; give package.module:callable or a .pt file")
    return _batches(ref, "--validation", "")


def _batches(ref: str, flag: str, also: str) -> list[tuple[Any, ...]]:
    """The batches ``flag`` names by a callable or a ``.pt`` file; ``also`` names its other forms."""
    if ref.endswith(".pt"):
        return _batches_file(ref, flag)
    if ":" in ref:
        function = load_object(ref, what=f"{flag} '{ref}'", error=BevelError)
        if not callable(function):
            raise BevelError(f"{flag} '{ref}' is a {type(function).__name__}, not a callable returning "
                             f"input tuples")
        with _cwd_on_path():
            try:
                batches = function()
            except BevelError:
                raise
            except (Exception, SystemExit) as error:
                raise BevelError(f"{flag} '{ref}': calling it raised {type(error).__name__}: "
                                 f"{first_line(error)}") from error
        return as_batches(batches, f"{flag} '{ref}'")
    raise BevelError(f"{flag} '{ref}' is not understood: give package.module:callable, a .pt file holding "
                     f"a list of input tuples{also}")


def load_object(ref: str, what: str, error: type[BevelError] = ModelLoadError) -> Any:
    """The attribute named by ``package.module:attribute`` (dots allowed after the colon), imported with
    the current directory on the path; ``what`` names the argument in error messages."""
    module_name, colon, attribute = ref.partition(":")
    if not colon or not module_name.strip() or not attribute.strip() or ":" in attribute:
        builtins = ", ".join(sorted(BUILTIN_MODELS))
        raise error(f"{what} is not a valid reference: expected 'package.module:callable' "
                    f"(e.g. 'mymodels:build') or a built-in name ({builtins})")
    with _cwd_on_path():
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise error(f"{what}: cannot import module '{module_name}': {exc}; check the spelling and that it "
                        f"is importable from the current directory or the installed packages") from exc
        # the module itself fails while importing (syntax error, code that raises or calls sys.exit)
        except (Exception, SystemExit) as exc:
            raise error(f"{what}: importing module '{module_name}' raised {type(exc).__name__}: "
                        f"{first_line(exc)}") from exc
    obj: Any = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            near = difflib.get_close_matches(part, names, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
            raise error(f"{what}: '{module_name}' has no attribute '{attribute}'{hint}")
        obj = getattr(obj, part)
    return obj


def as_batches(batches: Any, what: str) -> list[tuple[Any, ...]]:
    """``batches`` (an iterable of input tuples; a lone tensor counts as a 1-tuple) as a non-empty list of tuples."""
    result = calibration_batches(batches, what)
    if not result:
        raise BevelError(f"{what} gave no batches; give at least one input tuple")
    return result


def _model_and_inputs(ref: str, result: Any,
                      fallback_inputs: tuple[Any, ...] | None) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    """Check what a MODEL callable returned and split it into the module and its example inputs."""
    if isinstance(result, torch.nn.Module):
        if fallback_inputs is None:
            raise ModelLoadError(f"MODEL '{ref}' gave a {type(result).__name__} but no example inputs: the callable "
                                 f"must return (model, example_inputs) (with `bevel export`, --calibration can give "
                                 f"them instead: its first batch serves as example inputs)")
        return result, tuple(fallback_inputs)
    if isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0], torch.nn.Module):
        model, inputs = result
        if isinstance(inputs, torch.Tensor):
            return model, (inputs,)
        if isinstance(inputs, (tuple, list)):
            return model, tuple(inputs)
        raise ModelLoadError(f"MODEL '{ref}': the example inputs it returned are a {type(inputs).__name__}; they "
                             f"must be a tuple of positional inputs (or one tensor)")
    raise ModelLoadError(f"MODEL '{ref}' returned {_describe(result)}; the callable must return an nn.Module or "
                         f"(model, example_inputs)")


def _builtin_calibration(model_ref: str) -> list[tuple[Any, ...]]:
    module_name = BUILTIN_MODELS[model_ref].partition(":")[0]
    function = getattr(importlib.import_module(module_name), BUILTIN_CALIBRATION, None)
    if function is None:
        raise BevelError(f"the built-in model '{model_ref}' has no calibration batches of its own; "
                         f"give --calibration package.module:callable or a .pt file")
    return as_batches(function(), f"the calibration batches of '{model_ref}'")


def _batches_file(path: str, flag: str) -> list[tuple[Any, ...]]:
    if not os.path.isfile(path):
        raise BevelError(f"{flag} '{path}': no such file")
    try:
        batches = torch.load(path, weights_only=True)
    except Exception as error:  # a corrupt file or one holding objects weights_only refuses
        # some of torch.load's errors say little alone (a text file gives "KeyError: 101")
        kind, message = type(error).__name__, first_line(error)
        reason = kind if message == kind else f"{kind}: {message}"
        if not zipfile.is_zipfile(path):
            reason += "; the file is not the zip archive torch.save writes"
        raise BevelError(f"{flag} '{path}' could not be loaded with torch.load(weights_only=True) ({reason}); "
                         f"save a list of tuples of tensors with torch.save") from error
    if not isinstance(batches, (list, tuple)):
        raise BevelError(f"{flag} '{path}' holds a {type(batches).__name__}; it must hold a list of input "
                         f"tuples (torch.save([(ids, mask), ...], path))")
    return as_batches(batches, f"{flag} '{path}'")


@contextlib.contextmanager
def _cwd_on_path() -> Iterator[None]:
    """Let ``mymodels:build`` find mymodels.py in the current directory, as ``python -m`` would."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        kinds = ", ".join(type(v).__name__ for v in value[:4]) + (", ..." if len(value) > 4 else "")
        return f"a {type(value).__name__} of {len(value)} ({kinds})"
    return f"a {type(value).__name__}"
