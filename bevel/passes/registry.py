"""The registry of passes by name: ``@register_pass("prune.magnitude")`` adds one."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

from bevel.errors import PipelineError
from bevel.passes.base import Pass

_PASSES: dict[str, type[Pass]] = {}


def register_pass(name: str) -> Callable[[type[Pass]], type[Pass]]:
    """Class decorator: make a Pass subclass available under ``name`` in pipelines."""

    def decorate(cls: type[Pass]) -> type[Pass]:
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise TypeError(f"@register_pass('{name}') must decorate a Pass subclass, got {cls!r}")
        if "__dataclass_fields__" not in vars(cls.Params):
            # without @dataclass the fields would silently vanish and every parameter be refused
            raise TypeError(f"{cls.__qualname__}.Params must be decorated with @dataclass")
        if name in _PASSES and _PASSES[name] is not cls:
            raise ValueError(f"a pass named '{name}' is already registered ({_PASSES[name].__qualname__})")
        if "Params" not in vars(cls):
            # a Params class of its own, so that errors name this pass and not the class it inherits from
            cls.Params = dataclass(type("Params", (cls.Params,), {"__qualname__": f"{cls.__qualname__}.Params"}))
        cls.name = name
        cls.Params.pass_name = name
        _PASSES[name] = cls
        return cls

    return decorate


def nearest_pass_names(name: str, n: int = 3) -> list[str]:
    """The registered names closest to ``name``, best first."""
    _load_builtin_passes()
    return difflib.get_close_matches(name, list(_PASSES), n=n, cutoff=0.5)


def get_pass(name: str) -> type[Pass]:
    """The pass class registered under ``name``; a PipelineError suggests the nearest names."""
    _load_builtin_passes()
    if name not in _PASSES:
        near = nearest_pass_names(name)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise PipelineError(f"unknown pass '{name}'{hint} (run `bevel passes` to list them)")
    return _PASSES[name]


def available_passes() -> dict[str, type[Pass]]:
    """Every registered pass by name, sorted."""
    _load_builtin_passes()
    return dict(sorted(_PASSES.items()))


def _load_builtin_passes() -> None:
    import bevel.passes  # noqa: F401  (importing the package registers the built-in passes)
