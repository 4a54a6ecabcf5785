"""``lower``: make a rewritten graph ready to run on its target device.

bevel's custom ops carry one implementation per device (a Triton kernel for CUDA, a torch
reference for CPU) registered through ``torch.library``, so the dispatcher picks the kernel from
where the weights and inputs live. Lowering therefore places the weights on the device and points
every op that creates a tensor on a fixed device (``arange(..., device=cpu)`` as captured) to it.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx

from bevel.errors import BevelError
from bevel.ir.graph import Graph


def check_device(device: str | torch.device) -> torch.device:
    """Parse ``device`` and make sure this machine has it."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise BevelError(f"device={device!r} is not a device torch knows (try 'cpu' or 'cuda'): {error}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise BevelError(f"device={device!r} was asked for but this machine has no CUDA GPU; use device='cpu'")
    return parsed


def retarget_devices(module: fx.GraphModule, device: torch.device) -> int:
    """Point every ``device`` argument in the graph (factory ops, ``to``) at ``device``; returns how many."""
    changed = 0
    for node in module.graph.nodes:
        if node.op != "call_function":
            continue
        if isinstance(node.kwargs.get("device"), torch.device) and node.kwargs["device"] != device:
            node.update_kwarg("device", device)
            changed += 1
        schema = getattr(node.target, "_schema", None)
        for index, argument in enumerate(schema.arguments if schema is not None else ()):
            if (argument.name == "device" and index < len(node.args) and isinstance(node.args[index], torch.device)
                    and node.args[index] != device):
                node.update_arg(index, device)
                changed += 1
    module.recompile()
    return changed


def place(module: fx.GraphModule, device: str | torch.device, copy_first: bool = False) -> fx.GraphModule:
    """``module`` with its weights and its tensor-creating ops on ``device``; with ``copy_first`` a
    moved copy, leaving ``module`` as it is."""
    target = check_device(device)
    if copy_first:
        module = copy.deepcopy(module)
    module = module.to(target)
    retarget_devices(module, target)
    return module


def lower(graph: Graph, device: str | torch.device) -> fx.GraphModule:
    """The graph's module on ``device``, its code regenerated."""
    return place(graph.module, device)
