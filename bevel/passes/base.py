"""The pass interface: typed parameters, the context a pass runs in, and what it hands back."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from bevel.errors import ParamError

if typing.TYPE_CHECKING:
    import torch

    from bevel.ir.graph import Graph

_MISSING = dataclasses.MISSING


def param(default: Any, doc: str, *, ge: float | None = None, gt: float | None = None,
          le: float | None = None, lt: float | None = None,
          choices: tuple[Any, ...] | None = None) -> Any:
    """Declare a pass parameter: its default, one line of help, and the range or choices it accepts.

    The help and the bounds are shown by ``bevel passes``; the bounds are enforced whenever the
    pass's Params are made (from a pipeline string or in Python).
    """
    bounds = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices}
    return field(default=default, metadata={"doc": doc, **bounds})


@dataclass
class PassParams:
    """Base of every pass's ``Params`` dataclass. Subclasses declare fields with :func:`param`.

    Values are validated (type, range, choices) whenever an instance is made, however it is made.
    """

    pass_name: ClassVar[str] = ""  # set by @register_pass, so errors name the pass

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _check_value(self.pass_name, f.name, getattr(self, f.name), hints[f.name], f.metadata)
            setattr(self, f.name, value)

    @classmethod
    def describe(cls) -> list[dict[str, Any]]:
        """One dict per parameter: name, type, default, doc and the accepted range, for help output."""
        hints = typing.get_type_hints(cls)
        rows = []
        for f in dataclasses.fields(cls):
            rows.append({"name": f.name, "type": _type_name(hints[f.name]), "default": f.default,
                         "doc": f.metadata.get("doc", ""), "range": _range_text(f.metadata)})
        return rows

    @classmethod
    def names(cls) -> list[str]:
        """The parameter names this pass accepts."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], pass_name: str = "") -> "PassParams":
        # pass_name names the pass in the unknown-key message for Params not registered with a pass
        """Build validated parameters from user values; a ParamError names the first bad one.

        ints are accepted where a float is declared and lists where a tuple is declared.
        """
        known = cls.names()
        for key in values:
            if key not in known:
                raise ParamError(_unknown_param_message(pass_name or cls.pass_name, key, known), key=key)
        return cls(**values)  # __post_init__ checks each value

    def as_dict(self) -> dict[str, Any]:
        """The parameter values, including defaults."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def non_default(self) -> dict[str, Any]:
        """Only the values that differ from their defaults, to print a pass compactly."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.default is _MISSING or getattr(self, f.name) != f.default}


def _unknown_param_message(pass_name: str, key: str, known: list[str]) -> str:
    import difflib

    near = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    accepted = ", ".join(known) if known else "none"
    return f"pass '{pass_name}' has no parameter '{key}'{hint} (it accepts: {accepted})"


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _range_text(meta: typing.Mapping[str, Any]) -> str:
    if meta.get("choices") is not None:
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    low = f"[{meta['ge']}" if meta.get("ge") is not None else (f"({meta['gt']}" if meta.get("gt") is not None else "")
    high = f"{meta['le']}]" if meta.get("le") is not None else (f"{meta['lt']})" if meta.get("lt") is not None else "")
    if not low and not high:
        return ""
    return f"{low or '(-inf'}, {high or 'inf)'}"


def _matches_type(value: Any, tp: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits the annotation ``tp``; returns the value converted where that is lossless."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            ok, converted = _matches_type(value, option)
            if ok:
                return True, converted
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is typing.Literal:
        return value in typing.get_args(tp), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [value]  # a single name where a list of names is expected
        if not isinstance(value, (list, tuple)):
            return False, value
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        item_type = args[0] if args else Any
        items = []
        for item in value:
            ok, converted = _matches_type(item, item_type)
            if not ok:
                return False, value
            items.append(converted)
        return True, tuple(items) if origin is tuple else items
    return isinstance(value, tp), value


def _check_value(pass_name: str, key: str, value: Any, tp: Any, meta: typing.Mapping[str, Any]) -> Any:
    """``value`` converted to the declared type, or a ParamError naming the pass, the key and the rule."""
    ok, converted = _matches_type(value, tp)
    where = f"{pass_name}({key}=...)" if pass_name else key
    if not ok:
        raise ParamError(f"{where}: expected {_type_name(tp)}, got {value!r}", key=key)
    choices = meta.get("choices")
    if choices is not None and converted not in choices:
        raise ParamError(f"{where}: {value!r} is not one of {', '.join(repr(c) for c in choices)}", key=key)
    if isinstance(converted, float) and math.isnan(converted):  # NaN fails no comparison below
        bounds = _range_text(meta)
        raise ParamError(f"{where}: nan is not a number" + (f"; {key} must be in {bounds}" if bounds else ""), key=key)
    if isinstance(converted, (int, float)) and not isinstance(converted, bool):
        bad = ((meta.get("ge") is not None and converted < meta["ge"])
               or (meta.get("gt") is not None and converted <= meta["gt"])
               or (meta.get("le") is not None and converted > meta["le"])
               or (meta.get("lt") is not None and converted >= meta["lt"]))
        if bad:
            raise ParamError(f"{where}: {value!r} is out of range; {key} must be in {_range_text(meta)}", key=key)
    return converted


@dataclass
class PassContext:
    """What a pass may read besides the graph.

    ``calibration`` is a list of input tuples (the example inputs when the user gave none),
    ``example_inputs`` the inputs the graph was captured with, ``device`` the target device,
    ``seed`` the seed for any randomness, and ``max_fidelity_drop`` the budget the pass manager
    enforces after each pass (None: no budget). ``calibrated`` says whether ``calibration`` holds
    batches the user gave (False: it is only the example inputs). ``padding_masks`` holds each
    calibration batch's padding mask [B, N] (nonzero at real tokens) where the model is an encoder
    with one, else None: outputs at padded positions mean nothing, so measures leave them out.
    ``max_cache_len`` is a decoder's cache length (None for other models).
    """

    calibration: list[tuple[Any, ...]]
    example_inputs: tuple[Any, ...]
    device: str = "cpu"
    seed: int = 0
    max_fidelity_drop: float | None = None
    calibrated: bool = True
    padding_masks: list[torch.Tensor] | None = None
    max_cache_len: int | None = None


@dataclass
class PassResult:
    """What a pass reports: whether it changed the graph, figures of its own, and notes for the user."""

    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Pass:
    """A graph rewrite. Subclasses set ``Params`` and implement :meth:`run`.

    Class attributes a pass may declare, checked by the pass manager before anything runs:
    ``needs_calibration`` (real calibration batches are required), ``requires`` (names of passes
    that must come earlier in the pipeline), ``conflicts`` (passes that may not share a pipeline)
    and ``not_followed_by`` (passes that may only come earlier, each with why: what this pass makes
    of the graph is what they cannot rewrite).
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[PassParams]] = PassParams
    needs_calibration: ClassVar[bool] = False
    requires: ClassVar[tuple[str, ...]] = ()
    conflicts: ClassVar[tuple[str, ...]] = ()
    not_followed_by: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self, params: PassParams | None = None, **kwargs: Any) -> None:
        if params is not None and kwargs:
            raise ParamError(f"pass '{self.name}': give either a Params object or keyword values, not both")
        if params is not None and not isinstance(params, self.Params):
            raise ParamError(f"pass '{self.name}' takes {type(self).__name__}.Params, "
                             f"got {type(params).__name__}")
        self.params = params if params is not None else self.Params.from_dict(kwargs, self.name)

    def run(self, graph: "Graph", ctx: PassContext) -> PassResult:
        """Rewrite ``graph`` in place and say what changed."""
        raise NotImplementedError(f"pass '{self.name}' does not implement run()")

    def __repr__(self) -> str:
        values = self.params.non_default()
        if not values:
            return self.name
        return f"{self.name}(" + ", ".join(f"{k}={format_value(v)}" for k, v in values.items()) + ")"


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def format_value(value: Any) -> str:
    """A value as pipeline text that parses back to the same value (``"x"``, ``true``, ``none``, ``[1, 2]``)."""
    if value is None:
        return "none"
    if isinstance(value, str):
        return '"' + "".join(_ESCAPES.get(c, c) for c in value) + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return repr(value)
