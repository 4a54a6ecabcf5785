"""Lowering: weights and tensor-creating ops move to the target device (checked on 'meta', which every
machine has; a graph that still created tensors on the CPU would fail there with a device mismatch)."""

from __future__ import annotations

import pytest
import torch

from bevel.codegen.lower import check_device, place
from bevel.errors import BevelError
from bevel.ir import capture


class Positional(torch.nn.Module):
    """Adds positions made by arange inside forward, as HF models build position ids."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x):
        positions = torch.arange(x.shape[1], dtype=torch.float32).unsqueeze(-1)
        return self.linear(x + positions) + torch.ones(4).to(x.device)


def test_place_moves_weights_and_factory_ops():
    graph = capture(Positional().eval(), (torch.randn(2, 3, 4),))
    x = torch.randn(2, 5, 4, device="meta")
    with pytest.raises(RuntimeError, match="not on the expected device meta"):
        graph.module(x)  # as captured, arange makes a CPU tensor
    moved = place(graph.module, "meta", copy_first=True)
    assert moved(x).device.type == "meta"
    assert all(p.device.type == "cpu" for p in graph.module.parameters())  # copy_first left it alone
    cpu_input = torch.randn(2, 5, 4)
    same = place(graph.module, "cpu", copy_first=True)
    torch.testing.assert_close(same(cpu_input), graph.module(cpu_input), rtol=0, atol=0)


def test_check_device_names_the_problem():
    with pytest.raises(BevelError, match="not a device torch knows"):
        check_device("gpu0")
    for other in ("meta", "mps", "xpu"):  # devices torch knows but bevel's runtime does not run on
        with pytest.raises(BevelError, match=f"'cpu' or 'cuda', not '{other}'"):
            check_device(other)
    if not torch.cuda.is_available():
        with pytest.raises(BevelError, match="no CUDA GPU"):
            check_device("cuda")
