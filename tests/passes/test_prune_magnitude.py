"""prune.magnitude: the global threshold, the per-layer floor, skip patterns, activation importance
(Wanda), and differential checks.

Differential tolerance: pruning changes outputs by design, so the check compares the rewritten
graph with the original model whose weights were pruned by an independent reference (a single
global sort over all magnitudes; for Wanda, a sort of each row's scores from input norms recorded
with forward hooks); those two must agree to float rounding (1e-6).
"""

from __future__ import annotations

import pytest
import torch

import bevel
from bevel.compiler.captured import copy_model
from bevel.errors import ParamError, PassError, PipelineError
from bevel.ir import analysis, capture
from bevel.passes import PassContext, get_pass
from bevel.passes.prune.magnitude import global_magnitude_keep_counts
from tests.models_zoo import ConvNet, MLP, seeded


def prune(model, example, calibration=None, calibrated=True, **params):
    graph = capture(model, example)
    ctx = PassContext(calibration=calibration or [example], example_inputs=example, calibrated=calibrated)
    result = get_pass("prune.magnitude")(**params).run(graph, ctx)
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


def input_norms(model: torch.nn.Module, batches: list[tuple]) -> dict[str, torch.Tensor]:
    """||X_j||_2 of each Linear's input channels over ``batches``, recorded with forward hooks."""
    sums: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x ** 2).sum(0)
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for batch in batches:
            model(*batch)
    for handle in handles:
        handle.remove()
    return {f"{name}.weight": total.sqrt() for name, total in sums.items()}


def test_activation_importance_matches_a_per_row_wanda_reference():
    torch.manual_seed(2)
    model = MLP((16, 32, 8)).eval()
    calibration = [(torch.randn(6, 16, generator=seeded(i)),) for i in range(3)]
    graph, result = prune(model, calibration[0], calibration=calibration, sparsity=0.5, importance="activation")
    reference = copy_model(model)
    with torch.no_grad():
        for name, norm in input_norms(model, calibration).items():
            weight = reference.get_parameter(name)
            smallest = (weight.abs() * norm).sort(dim=1).indices[:, : weight.shape[1] // 2]
            weight.scatter_(1, smallest, 0.0)
    for name, weight in dict(reference.named_parameters()).items():
        if name.endswith("weight"):
            assert torch.equal(graph.param(name), weight), name
            assert ((graph.param(name) == 0).sum(dim=1) == weight.shape[1] // 2).all()  # every row alike
    x = torch.randn(5, 16, generator=seeded(9))
    with torch.no_grad():
        assert (graph(x) - reference(x)).abs().max() <= 1e-6
    assert result.stats["sparsity"] == pytest.approx(0.5)
    assert result.stats["importance"] == "activation"


class LoudChannels(torch.nn.Module):
    """Two Linears fed by inputs whose first 4 channels are 20x louder than the rest, as the outlier
    features of transformer activations are."""

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(64, 128)
        self.second = torch.nn.Linear(128, 32)
        self.register_buffer("gain", torch.cat([torch.full((4,), 20.0), torch.ones(60)]))

    def forward(self, x):
        return self.second(torch.relu(self.first(x * self.gain)))


def test_activation_importance_beats_magnitude_when_a_few_channels_are_loud():
    torch.manual_seed(3)
    model = LoudChannels().eval()
    calibration = [(torch.randn(32, 64, generator=seeded(10 + i)),) for i in range(4)]
    fresh = torch.randn(256, 64, generator=seeded(20))
    with torch.no_grad():
        exact = model(fresh)
    errors = {}
    for importance in ("magnitude", "activation"):
        graph, result = prune(copy_model(model), calibration[0], calibration=calibration, sparsity=0.5,
                              importance=importance)
        assert result.stats["sparsity"] == pytest.approx(0.5, abs=0.01)  # the same sparsity
        with torch.no_grad():
            errors[importance] = float((graph(fresh) - exact).norm() / exact.norm())
    print(f"relative output error at 50% sparsity: magnitude {errors['magnitude']:.4f}, "
          f"activation {errors['activation']:.4f}")
    assert errors["activation"] < errors["magnitude"]


def test_activation_importance_without_calibration_is_refused():
    model = MLP().eval()
    with pytest.raises(PassError, match="importance='activation' needs calibration"):
        prune(model, (torch.randn(2, 16),), calibrated=False, importance="activation")
    with pytest.raises(PipelineError, match="prune.magnitude.*needs calibration"):
        bevel.compile(model, 'prune.magnitude(importance="activation")', example_inputs=(torch.randn(2, 16),))


def test_activation_importance_leaves_conv_weights_dense_and_says_so():
    torch.manual_seed(4)
    model = ConvNet().eval()
    graph, result = prune(model, (torch.randn(2, 3, 8, 8),), sparsity=0.5, importance="activation")
    assert list(result.stats["per_layer_sparsity"]) == ["head.weight"]
    assert torch.equal(graph.param("conv1.weight"), model.conv1.weight)
    assert any("conv1.weight" in note and "Linear" in note for note in result.notes)


def test_activation_importance_with_zero_sparsity_changes_nothing():
    model = MLP().eval()
    graph, _ = prune(model, (torch.randn(2, 16),), sparsity=0.0, importance="activation")
    x = torch.randn(3, 16)
    assert torch.equal(graph(x), model(x))
