"""prune.magnitude: the global threshold, the per-layer floor, skip patterns, and a differential check.

Differential tolerance: pruning changes outputs by design, so the check compares the rewritten
graph with the original model whose weights were pruned by an independent reference (a single
global sort over all magnitudes); those two must agree to float rounding (1e-6).
"""

from __future__ import annotations

import pytest
import torch

from bevel.compiler.compile import copy_model
from bevel.errors import ParamError
from bevel.ir import analysis, capture
from bevel.passes import PassContext, get_pass
from bevel.passes.prune.magnitude import global_magnitude_keep_counts
from tests.models_zoo import ConvNet, MLP


def prune(model, example, **params):
    graph = capture(model, example)
    result = get_pass("prune.magnitude")(**params).run(graph, PassContext(calibration=[example],
                                                                            example_inputs=example))
    return graph, result


def test_global_threshold_matches_a_reference_sort_and_outputs_follow():
    torch.manual_seed(0)
    model = MLP((16, 32, 8)).eval()
    graph, result = prune(model, (torch.randn(2, 16),), sparsity=0.4, min_keep=1e-6)
    # reference: one sort over every weight magnitude, cut at 40%
    weights = {n: p.detach() for n, p in model.named_parameters() if n.endswith("weight")}
    everything = torch.cat([w.abs().flatten() for w in weights.values()]).sort().values
    threshold = everything[round(0.4 * everything.numel()) - 1]
    reference = MLP((16, 32, 8)).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, w in weights.items():
            reference.get_parameter(name).copy_(torch.where(w.abs() <= threshold, 0.0, w))
    for name, w in weights.items():
        assert torch.equal(graph.param(name), reference.get_parameter(name)), name
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert (graph(x) - reference(x)).abs().max() <= 1e-6
    assert result.stats["sparsity"] == pytest.approx(0.4, abs=1e-3)
    assert analysis.weight_sparsity(graph) == pytest.approx(0.4, abs=1e-3)
    assert graph.lint() == []


def test_floor_keeps_every_layer_alive():
    weights = {"big": torch.randn(100, 100), "tiny": torch.randn(10, 10) * 1e-3}
    keep = global_magnitude_keep_counts(weights, sparsity=0.5, min_keep=0.1)
    assert keep["tiny"] == 10  # without the floor the whole small-magnitude layer would go
    assert sum(keep.values()) == round(0.5 * 10100)  # the big layer prunes more to reach the target


def test_unreachable_target_is_reported():
    model = MLP((16, 32, 8)).eval()
    graph, result = prune(model, (torch.randn(2, 16),), sparsity=0.99, min_keep=0.5)
    assert result.stats["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert any("min_keep" in note for note in result.notes)


def test_skip_patterns_leave_layers_dense_and_conv_is_pruned():
    torch.manual_seed(1)
    model = ConvNet().eval()
    graph, result = prune(model, (torch.randn(2, 3, 8, 8),), sparsity=0.5, skip=("head.*",))
    assert torch.equal(graph.param("head.weight"), model.head.weight)
    assert result.stats["per_layer_sparsity"].keys() == {"conv1.weight", "conv2.weight"}
    conv_total = model.conv1.weight.numel() + model.conv2.weight.numel()
    conv_zeros = int((graph.param("conv1.weight") == 0).sum() + (graph.param("conv2.weight") == 0).sum())
    assert conv_zeros / conv_total == pytest.approx(0.5, abs=0.01)


def test_zero_sparsity_changes_nothing():
    model = MLP().eval()
    graph, _ = prune(model, (torch.randn(2, 16),), sparsity=0.0)
    x = torch.randn(3, 16)
    assert torch.equal(graph(x), model(x))


@pytest.mark.parametrize("params, fragment", [
    ({"sparsity": 1.5}, "sparsity must be in [0.0, 1.0)"),
    ({"sparsity": -0.1}, "sparsity must be in [0.0, 1.0)"),
    ({"min_keep": 0.0}, "min_keep must be in (0.0, 1.0]"),
    ({"sparsity": "half"}, "expected float"),
    ({"skip": 3}, "expected tuple"),
    ({"sparsty": 0.3}, "did you mean 'sparsity'"),
])
def test_bad_params_are_refused_with_the_name_and_range(params, fragment):
    with pytest.raises(ParamError) as info:
        get_pass("prune.magnitude")(**params)
    assert fragment in str(info.value)


def test_minilm_real_weights_global_sparsity(minilm, minilm_inputs, fresh_sentences):
    graph, result = prune(copy_model(minilm), minilm_inputs, sparsity=0.3)  # the graph shares the model's weights
    linear_weights = analysis.layer_weights(graph)
    assert len(linear_weights) == 37  # 6 layers x 6 linears + the pooler
    zeros = sum(int((w == 0).sum()) for w in linear_weights.values())
    total = sum(w.numel() for w in linear_weights.values())
    assert zeros / total == pytest.approx(0.3, abs=0.01)
    assert min(1 - s for s in result.stats["per_layer_sparsity"].values()) >= 0.01  # the floor holds
    out = graph(*fresh_sentences)
    assert torch.isfinite(out.last_hidden_state).all()
    assert out.last_hidden_state.shape == minilm(*fresh_sentences).last_hidden_state.shape


class TiedLM(torch.nn.Module):
    """An embedding whose table is also the output projection, as in GPT-2."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 8)
        self.hidden = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 20, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.hidden(self.embed(ids))))


def test_tied_weights_are_left_dense_and_reported():
    model = TiedLM().eval()
    graph, result = prune(model, (torch.randint(0, 20, (2, 5)),), sparsity=0.5)
    assert list(result.stats["per_layer_sparsity"]) == ["hidden.weight"]
    assert any("tied" in note for note in result.notes)
    assert torch.equal(graph.param("head.weight"), model.embed.weight)  # the shared table is untouched
