"""torch.export's input guards for a graph whose inputs a pass resized.

A module captured with torch.export checks its inputs on every call through a ``_guards_fn``
submodule: code generated from the capture's guards, such as ``past_key_0.size()[1] == 2``. A pass
that cuts a graph input the caller allocates from the graph's shapes (``prune.structured`` removing
KV heads from a decoder's cache) makes that size wrong. :func:`resize_guarded_inputs` wraps the
guards: the resized sizes are checked as they are now, and the captured guards, which hold every
other relation between the inputs (the batch they share, the cache length), see the sizes they were
generated for.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

GUARDS = "_guards_fn"  # the submodule torch.export's unlifted modules call with their inputs


class _Sized:
    """An input as the captured guards knew it: its ``size()`` before the resize, anything else its own."""

    def __init__(self, tensor: torch.Tensor, shape: torch.Size) -> None:
        self._tensor, self._shape = tensor, shape

    def size(self, dim: int | None = None) -> Any:
        return self._shape if dim is None else self._shape[dim]

    @property
    def shape(self) -> torch.Size:
        return self._shape

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tensor, name)


class ResizedInputGuards(torch.nn.Module):
    """The captured ``guards`` of a graph whose input ``i`` had dimension ``d`` resized from ``before`` to
    ``now``: ``resized[i] = (name, {d: (now, before)})``."""

    def __init__(self, guards: torch.nn.Module, resized: dict[int, tuple[str, dict[int, tuple[int, int]]]]) -> None:
        super().__init__()
        self.guards = guards
        self.resized = resized
        self._is_impure = True  # called for its checks alone: dead-code elimination must keep it

    def forward(self, *args: Any) -> None:
        args = list(args)
        for index, (name, dims) in self.resized.items():
            shape = list(args[index].shape)
            for dim, (now, before) in dims.items():
                torch._assert(shape[dim] == now, f"input '{name}' must have size {now} in dimension {dim}")
                shape[dim] = before
            args[index] = _Sized(args[index], torch.Size(shape))
        return self.guards(*args)


def resize_guarded_inputs(module: fx.GraphModule, resized: dict[str, dict[int, tuple[int, int]]]) -> None:
    """Make ``module``'s input guards (if it has them) accept the inputs named in ``resized`` with their
    dimensions resized: ``resized[name] = {dim: (size now, size before)}``."""
    calls = [n for n in module.graph.nodes if n.op == "call_module" and n.target == GUARDS]
    if not calls:
        return
    (call,) = calls
    positions = {arg.name: i for i, arg in enumerate(call.args) if isinstance(arg, fx.Node)}
    wrapped = {positions[name]: (name, dims) for name, dims in resized.items() if name in positions}
    if wrapped:
        setattr(module, GUARDS, ResizedInputGuards(getattr(module, GUARDS), wrapped))
