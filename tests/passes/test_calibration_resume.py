"""Sequential calibration resumes its runs: GPTQ (stage by stage) and whitened lowrank (group by
group) gather each stage's statistics from where the previous stage's rewrite began, not from the
inputs, and get bit for bit the weights they get when every run starts at the inputs."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import bevel
from bevel.passes import lowrank
from bevel.passes.quantize import rewrite
from tests.models_zoo import AttentionBlock, seeded

PIPELINES = {"gptq": 'quantize.int4_weight(group_size=32, method="gptq")',  # with the float reference run
             "gptq_plain": 'quantize.int4_weight(group_size=32, method="gptq", asymmetric=False)',
             "lowrank": "lowrank(energy=0.9)"}


class SeparateProjections(nn.Module):
    """Attention with query, key and value layers of their own (one stage of three layers), each
    reshaped as soon as it is computed, so a run reaching the value layer holds values made from
    the query layer's output."""

    def __init__(self, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.norm(x)
        q = self.q(h).view(b, n, self.heads, -1).transpose(1, 2)
        k = self.k(h).view(b, n, self.heads, -1).transpose(1, 2)
        v = self.v(h).view(b, n, self.heads, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.o(y.transpose(1, 2).reshape(b, n, d))


def encoder() -> nn.Module:
    """Pre-norm blocks: residuals carry values across the points where the runs resume."""
    torch.manual_seed(0)
    return nn.Sequential(AttentionBlock(dim=64, heads=4), SeparateProjections(), AttentionBlock(dim=64, heads=4),
                         SeparateProjections()).eval()


def calibration() -> list[tuple[torch.Tensor]]:
    g = seeded(1)
    return [(torch.randn(2, 12, 64, generator=g),) for _ in range(4)]


def compile_counting(pipeline: str, monkeypatch) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """The compiled weights, the output on a fresh input, and how many nodes the interpreters ran."""
    runs = 0
    run_node = fx.Interpreter.run_node

    def counting(self, node):
        nonlocal runs
        runs += 1
        return run_node(self, node)

    monkeypatch.setattr(fx.Interpreter, "run_node", counting)
    batches = calibration()
    compiled = bevel.compile(encoder(), pipeline, example_inputs=batches[0], calibration=batches)
    monkeypatch.setattr(fx.Interpreter, "run_node", run_node)
    weights = {k: v.clone() for k, v in compiled.graph_module.state_dict().items()}
    with torch.no_grad():
        out = compiled(torch.randn(3, 10, 64, generator=seeded(7)))
    return weights, out, runs


@pytest.mark.parametrize("name", list(PIPELINES))
def test_resumed_runs_give_the_same_weights_with_fewer_nodes_run(name, monkeypatch):
    if name == "lowrank":  # a budget of two 128 x 128 input sums: several groups
        monkeypatch.setattr(lowrank, "HESSIAN_BUDGET", 2 * 128 * 128)
    weights, out, resumed_runs = compile_counting(PIPELINES[name], monkeypatch)
    # every run from the inputs, as before resuming existed
    monkeypatch.setattr(rewrite, "Resume", lambda: None)
    monkeypatch.setattr(lowrank, "Resume", lambda: None)
    fresh_weights, fresh_out, fresh_runs = compile_counting(PIPELINES[name], monkeypatch)
    print(f"{name}: interpreter node runs {fresh_runs} from the inputs, {resumed_runs} resumed")
    assert weights.keys() == fresh_weights.keys()
    assert all(torch.equal(weights[k], fresh_weights[k]) for k in weights)
    assert torch.equal(out, fresh_out)
    assert resumed_runs < 0.7 * fresh_runs
