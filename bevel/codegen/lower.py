"""``lower``: make a rewritten graph ready to run on its target device.

bevel's custom ops carry one implementation per device (a Triton kernel for CUDA, a torch
reference for CPU) registered through ``torch.library``, so the dispatcher picks the kernel from
where the weights and inputs live. Lowering therefore places the weights on the device and points
every op that creates a tensor on a fixed device (``arange(..., device=cpu)`` as captured) to it.
"""

from __future__ import annotations

import copy
from typing import Any

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


def _device_arguments(node: fx.Node) -> list[tuple[str | int, torch.device]]:
    """The ``device`` arguments of a call, by keyword or position: ``[(key or index, device)]``."""
    found: list[tuple[str | int, torch.device]] = []
    if isinstance(node.kwargs.get("device"), torch.device):
        found.append(("device", node.kwargs["device"]))
    schema = getattr(node.target, "_schema", None)
    for index, argument in enumerate(schema.arguments if schema is not None else ()):
        if argument.name == "device" and index < len(node.args) and isinstance(node.args[index], torch.device):
            found.append((index, node.args[index]))
    return found


def graph_devices(module: fx.GraphModule) -> set[str]:
    """Device types the module's weights live on or its ops create tensors on."""
    devices = {t.device.type for t in list(module.parameters()) + list(module.buffers())}
    for node in module.graph.nodes:
        if node.op == "call_function":
            devices.update(device.type for _, device in _device_arguments(node))
    return devices


def retarget_devices(module: fx.GraphModule, device: torch.device) -> None:
    """Point every ``device`` argument in the graph (factory ops, ``to``) at ``device``."""
    for node in module.graph.nodes:
        if node.op != "call_function":
            continue
        for key, _ in _device_arguments(node):
            if isinstance(key, str):
                node.update_kwarg(key, device)
            else:
                node.update_arg(key, device)
    module.recompile()


def place(module: fx.GraphModule, device: str | torch.device, copy_first: bool = False) -> fx.GraphModule:
    """``module`` with its weights and its tensor-creating ops on ``device``; with ``copy_first`` a
    moved copy, leaving ``module`` as it is. The copy's weights are made directly on ``device``, so
    copying a GPU model to the CPU never holds two copies of its weights on the GPU."""
    target = check_device(device)
    if copy_first:
        memo: dict[int, Any] = {}
        for tensor in list(module.parameters()) + list(module.buffers()):
            moved = tensor.detach().to(target, copy=True)
            memo[id(tensor)] = (torch.nn.Parameter(moved, requires_grad=tensor.requires_grad)
                                if isinstance(tensor, torch.nn.Parameter) else moved)
        module = copy.deepcopy(module, memo)
    module = module.to(target)
    retarget_devices(module, target)
    return module


def lower(graph: Graph, device: str | torch.device) -> fx.GraphModule:
    """The graph's module on ``device``, its code regenerated."""
    return place(graph.module, device)
