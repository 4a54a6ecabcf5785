"""``lower``: make a rewritten graph ready to run on its target device.

bevel's custom ops carry one implementation per device (a Triton kernel for CUDA, a torch
reference for CPU) registered through ``torch.library``, so the dispatcher picks the kernel from
where the weights and inputs live; lowering therefore places the weights on the device and
regenerates the module's code.
"""

from __future__ import annotations

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


def lower(graph: Graph, device: str | torch.device) -> fx.GraphModule:
    """The graph's module with its weights on ``device`` and its code regenerated."""
    module = graph.module.to(check_device(device))
    module.recompile()
    return module
