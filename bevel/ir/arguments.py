"""Reading a call node's arguments by their schema names, whether passed by position or by keyword."""

from __future__ import annotations

from typing import Any

import torch.fx as fx

def find_argument(node: fx.Node, name: str) -> tuple[str | int, Any] | None:
    """``(key, value)`` of the argument ``name`` as the call passes it (key: the keyword, or the
    position in ``node.args``), or None when the call leaves it to its default."""
    if name in node.kwargs:
        return name, node.kwargs[name]
    schema = getattr(node.target, "_schema", None)
    for index, argument in enumerate(schema.arguments if schema is not None else ()):
        if argument.name == name:
            return (index, node.args[index]) if index < len(node.args) else None
    return None


def positional_default(target: Any, index: int) -> Any:
    """The schema default of positional argument ``index`` of an op (None where it gives none)."""
    arguments = getattr(getattr(target, "_schema", None), "arguments", ())
    if index < len(arguments) and arguments[index].has_default_value():
        return arguments[index].default_value
    return None


def argument(node: fx.Node, name: str, default: Any) -> Any:
    """The value the call passes for ``name``, or ``default`` when it passes none."""
    found = find_argument(node, name)
    return default if found is None else found[1]


def set_argument(node: fx.Node, key: str | int, value: Any) -> None:
    """Replace the argument found at ``key`` (a keyword or a position) by ``value``."""
    if isinstance(key, str):
        node.update_kwarg(key, value)
    else:
        node.update_arg(key, value)
