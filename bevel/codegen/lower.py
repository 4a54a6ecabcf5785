"""``lower``: make a rewritten graph ready to run on its target device.

bevel's custom ops carry one implementation per device (a Triton kernel for CUDA, a torch
reference for CPU) registered through ``torch.library``, so the dispatcher picks the kernel from
where the weights and inputs live. Lowering therefore places the weights on the device and points
every op that creates a tensor on a fixed device (``arange(..., device=cpu)`` as captured) to it.
For CUDA it also rewrites the convolutions cuDNN runs slowly and a matrix product runs fast
(:mod:`bevel.codegen.patch_conv`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx

from bevel.codegen.patch_conv import patch_convs_as_matmuls
from bevel.errors import BevelError
from bevel.ir.arguments import find_argument, set_argument
from bevel.ir.graph import Graph


def check_device(device: str | torch.device) -> torch.device:
    """Parse ``device`` and make sure this machine has it."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise BevelError(f"device={device!r} is not a device torch knows (try 'cpu' or 'cuda'): {error}") from None
    if parsed.type not in ("cpu", "cuda"):  # the runtime and its kernels know these two
        raise BevelError(f"device={device!r}: bevel compiles for 'cpu' or 'cuda', not {parsed.type!r}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise BevelError(f"device={device!r} was asked for but this machine has no CUDA GPU; use device='cpu'")
    return parsed


def _device_argument(node: fx.Node) -> tuple[str | int, torch.device] | None:
    """Where a call passes a fixed ``device`` (factory ops, ``to``), and which one; None if it does not."""
    found = find_argument(node, "device") if node.op == "call_function" else None
    return found if found is not None and isinstance(found[1], torch.device) else None


def graph_devices(module: fx.GraphModule) -> set[str]:
    """Device types the module's weights live on or its ops create tensors on."""
    devices = {t.device.type for t in list(module.parameters()) + list(module.buffers())}
    for node in module.graph.nodes:
        found = _device_argument(node)
        if found is not None:
            devices.add(found[1].type)
    return devices


def retarget_devices(module: fx.GraphModule, device: torch.device) -> None:
    """Point every ``device`` argument in the graph (factory ops, ``to``) at ``device``."""
    for node in module.graph.nodes:
        found = _device_argument(node)
        if found is not None:
            set_argument(node, found[0], device)
    module.recompile()


def place(module: fx.GraphModule, device: str | torch.device, copy_first: bool = False) -> fx.GraphModule:
    """``module`` with its weights and its tensor-creating ops on ``device``; with ``copy_first`` a
    moved copy, leaving ``module`` as it is. The copy's weights are made directly on ``device``, so
    copying a GPU model to the CPU never holds two copies of its weights on the GPU. The device is
    the caller's to check (:func:`check_device` at the entry points), so any torch device places."""
    target = torch.device(device)
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
    """The graph's module on ``device``, its code regenerated. For CUDA, patch convolutions first
    become matrix products (:mod:`bevel.codegen.patch_conv`)."""
    if check_device(device).type == "cuda" and patch_convs_as_matmuls(graph):
        graph.refresh()
    return place(graph.module, device)
