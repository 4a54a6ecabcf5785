"""The pass manager: order checks before work, instruments, and rollback of failing or unfaithful passes."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import bevel
from bevel.errors import PipelineError
from bevel.ir.graph import Graph
from bevel.passes import Pass, PassContext, PassParams, PassResult, register_pass
from tests.models_zoo import MLP

aten = torch.ops.aten


@register_pass("test.manager.scale")
class ScaleWeights(Pass):
    """Multiplies every Linear weight by ``factor``: a pass whose fidelity cost is controllable."""

    @dataclass
    class Params(PassParams):
        factor: float = 1.0

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        for node in graph.nodes(target=aten.linear.default):
            name = node.args[1].target
            graph.set_param(name, graph.param(name) * self.params.factor)
        return PassResult(changed=self.params.factor != 1.0)


@register_pass("test.manager.crash")
class Crash(Pass):
    """Breaks the graph, then raises."""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        graph.set_param("layers.0.weight", torch.full_like(graph.param("layers.0.weight"), float("nan")))
        raise RuntimeError("boom")


@register_pass("test.manager.dangling")
class Dangling(Pass):
    """Deletes a weight the graph still reads: lint must catch it."""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        graph.delete_param("layers.0.bias")
        return PassResult(changed=True)


@register_pass("test.manager.needs_data")
class NeedsData(Pass):
    needs_calibration = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        return PassResult(changed=False)


@register_pass("test.manager.after_cleanup")
class AfterCleanup(Pass):
    requires = ("cleanup",)
    conflicts = ("test.manager.needs_data",)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        return PassResult(changed=False)


def compile_mlp(passes, **kwargs):
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(4, 16)
    return model, x, bevel.compile(model, passes, example_inputs=(x,), **kwargs)


def test_a_pass_that_breaks_the_budget_is_rolled_back_and_the_report_says_why():
    model, x, cm = compile_mlp("cleanup | test.manager.scale(factor=-1.0) | test.manager.scale(factor=1.0)",
                               max_fidelity_drop=0.01)
    entry = cm.report.passes[1]
    assert entry.status == "rolled back"
    assert "max_fidelity_drop=0.01" in entry.reason and entry.fidelity.cosine < 0.99
    assert cm.report.passes[2].status == "no change"
    assert torch.allclose(cm(x), model(x), atol=1e-6)  # the rollback restored the weights
    assert "rolled back" in str(cm.report)


def test_within_budget_the_pass_is_kept():
    model, x, cm = compile_mlp("test.manager.scale(factor=1.001)", max_fidelity_drop=0.01)
    assert cm.report.passes[0].status == "applied"
    assert cm.report.passes[0].fidelity.cosine > 0.99


def test_a_crashing_pass_is_rolled_back_and_reported():
    model, x, cm = compile_mlp("test.manager.crash | cleanup")
    assert cm.report.passes[0].status == "failed"
    assert "RuntimeError: boom" in cm.report.passes[0].reason
    assert torch.isfinite(cm(x)).all()
    assert cm.report.passes[1].status == "applied"


def test_a_malformed_graph_is_caught_by_lint_and_rolled_back():
    model, x, cm = compile_mlp("test.manager.dangling")
    entry = cm.report.passes[0]
    assert entry.status == "rolled back"
    assert "malformed" in entry.reason and "layers.0.bias" in entry.reason
    assert torch.allclose(cm(x), model(x), atol=1e-6)


def test_order_requirements_are_checked_before_any_work():
    with pytest.raises(PipelineError, match="requires 'cleanup' earlier"):
        compile_mlp("test.manager.after_cleanup | cleanup")
    with pytest.raises(PipelineError, match="needs calibration data"):
        compile_mlp("test.manager.needs_data")
    with pytest.raises(PipelineError, match="cannot be in the same pipeline"):
        compile_mlp("cleanup | test.manager.after_cleanup | test.manager.needs_data",
                    calibration=[(torch.randn(4, 16),)])


def test_instruments_record_time_size_flops_and_fidelity():
    model, x, cm = compile_mlp("cleanup | prune.magnitude(sparsity=0.5)")
    report = cm.report
    assert report.original.params == sum(p.numel() for p in model.parameters())
    assert report.original.flops == 2 * 4 * 16 * 32 + 2 * 4 * 32 * 8
    prune_entry = report["prune.magnitude"]
    assert prune_entry.seconds > 0
    assert prune_entry.before.sparsity == 0.0 and prune_entry.after.sparsity == pytest.approx(0.5, abs=0.01)
    assert 0 < prune_entry.fidelity.cosine < 1 and prune_entry.fidelity.max_abs_error > 0
    data = report.to_json()
    assert data["passes"][1]["after"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert bevel.compiler.report.Report.from_json(data).to_json() == data


def test_top1_agreement_is_reported_for_logits():
    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = MLP((16, 32, 10))

        def forward(self, x):
            return {"logits": self.mlp(x)}

    torch.manual_seed(0)
    batches = [(torch.randn(64, 16),)]
    exact = bevel.compile(Classifier().eval(), "cleanup", example_inputs=batches[0], calibration=batches)
    assert exact.report.passes[0].fidelity.top1_agreement == 1.0
    model = Classifier().eval()
    damaged = bevel.compile(model, "test.manager.scale(factor=-1.0)", example_inputs=batches[0], calibration=batches)
    # the same damage done by hand: the agreement must be the measured share of unchanged argmaxes
    flipped = Classifier().eval()
    flipped.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer in flipped.mlp.layers:
            layer.weight.neg_()
        expected = (flipped(*batches[0])["logits"].argmax(-1) == model(*batches[0])["logits"].argmax(-1))
    agreement = damaged.report.passes[0].fidelity.top1_agreement
    assert agreement == pytest.approx(expected.float().mean().item())
    assert agreement < 1.0
