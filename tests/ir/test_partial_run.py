"""Partial runs stop where they were told to, without paying for torch's error report: stopping is
not an error, and formatting the graph for the trace log on every stop cost int4 GPTQ on MiniLM
more time than its runs (107 s of 230)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.fx as fx
from torch import nn

import bevel
from bevel.ir.partial_run import PartialInterpreter, SeenAll
from tests.models_zoo import MLP, seeded


class StopAtRelu(PartialInterpreter):
    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.ran: list[str] = []

    def run_node(self, n: fx.Node) -> Any:
        self.ran.append(n.name)
        if n.target is torch.relu:
            raise SeenAll
        return super().run_node(n)


class Chain(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + 1) * 2


@pytest.fixture
def formatted(monkeypatch) -> list[int]:
    """Counts the times a graph module is formatted (what torch's interpreter does on an error)."""
    calls: list[int] = []
    print_readable = fx.GraphModule.print_readable

    def counting(self, *args, **kwargs):
        calls.append(1)
        return print_readable(self, *args, **kwargs)

    monkeypatch.setattr(fx.GraphModule, "print_readable", counting)
    return calls


def test_a_partial_run_stops_at_the_node_that_raises_and_does_not_format_the_graph(formatted):
    interpreter = StopAtRelu(fx.symbolic_trace(Chain()))
    interpreter.run_until_seen(torch.ones(3))
    assert interpreter.ran == ["x", "add", "relu"]  # the multiply after the stop never ran
    assert formatted == []


def test_a_partial_run_without_a_stop_runs_to_the_end():
    class Plain(nn.Module):
        def forward(self, x):
            return x * 3

    interpreter = StopAtRelu(fx.symbolic_trace(Plain()))
    interpreter.run_until_seen(torch.ones(2))
    assert interpreter.ran == ["x", "mul", "output"]


def test_other_errors_still_propagate():
    class Failing(PartialInterpreter):
        def run_node(self, n):
            if n.op == "call_function":
                raise ValueError("broken node")
            return super().run_node(n)

    with pytest.raises(ValueError, match="broken node"):
        Failing(fx.symbolic_trace(Chain())).run_until_seen(torch.ones(3))


@pytest.mark.parametrize("pipeline", ['quantize.int4_weight(group_size=32, method="gptq")',
                                      "quantize.int8_dynamic(smooth=0.5)", "prune.structured(ratio=0.25)"])
def test_calibrating_passes_never_format_the_graph(pipeline, formatted):
    """The passes that gather statistics stop each run after the last layer they watch."""
    torch.manual_seed(0)
    model = MLP((64, 128, 64)).eval()
    g = seeded(3)
    calibration = [(torch.randn(8, 64, generator=g),) for _ in range(3)]
    compiled = bevel.compile(model, pipeline, example_inputs=calibration[0], calibration=calibration)
    assert compiled.report.passes[0].status == "applied"
    assert formatted == []
