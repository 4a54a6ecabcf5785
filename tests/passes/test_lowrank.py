"""lowrank: ranks by energy and by parameter ratio, exactness at full energy, layers not worth
factorizing, skip patterns, HF Conv1D (addmm) layers and bad parameters; with calibration, the
truncation whitened by each layer's inputs against plain SVD, and energy as the output energy kept.

Differential tolerance: with ``energy=1.0`` a weight of exact rank r is rebuilt from its r singular
triplets, so the two thin linears compute the same function up to float32 rounding: the factors are
rounded to float32 (relative 6e-8 per entry) and summed over r + K terms instead of K. The relative
output error is bounded by 1e-5, two orders above that rounding, far below any real truncation.
"""

from __future__ import annotations

import pytest
import torch

import bevel
from bevel.compiler.captured import copy_model
from bevel.errors import ParamError
from bevel.ir import analysis, capture
from bevel.passes import PassContext, get_pass
from bevel.passes.lowrank import DAMPING
from tests.models_zoo import MLP, seeded


def factorize(model, example, calibration=None, **params):
    """Run lowrank on a fresh capture; without ``calibration`` the context holds only the example
    inputs (uncalibrated), so the weights' own SVD is truncated."""
    graph = capture(copy_model(model), example)
    ctx = PassContext(calibration=calibration or [example], example_inputs=example, calibrated=calibration is not None)
    return graph, get_pass("lowrank")(**params).run(graph, ctx)


def low_rank_mlp(rank: int = 4) -> MLP:
    """MLP 64 -> 96 -> 64 whose first weight has exact rank ``rank``; the second is random (full rank)."""
    model = MLP((64, 96, 64)).eval()
    left, right = torch.randn(96, rank, generator=seeded(1)), torch.randn(rank, 64, generator=seeded(2))
    with torch.no_grad():
        model.layers[0].weight.copy_(left @ right / rank)
    return model


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_full_energy_is_exact_on_a_low_rank_weight_and_leaves_a_full_rank_one():
    torch.manual_seed(0)
    model = low_rank_mlp(rank=4)
    graph, result = factorize(model, (torch.randn(3, 64),), energy=1.0)
    layer = result.stats["layers"]["layers.0.weight"]
    assert layer["rank"] == 4 and layer["params"] == [96 * 64, 4 * (96 + 64)]
    # the random 64x96 weight has full rank 64, and 64 x (64 + 96) > 64 x 96
    assert "layers.1.weight" in result.stats["left"]
    assert any("layers.1.weight" in note for note in result.notes)
    x = torch.randn(11, 64, generator=seeded(3))
    with torch.no_grad():
        assert relative_error(graph(x), model(x)) <= 1e-5
    assert analysis.param_count(graph) < sum(p.numel() for p in model.parameters())
    names = set(graph.tensors())
    assert "layers.0.weight" not in names and "layers.1.weight" in names
    assert graph.lint() == []


def test_a_layer_reading_a_factorized_layer_directly_is_factorized_too():
    # the second layer's input is the first one's replacement, whose shape the FLOP count reads
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 64)).eval()
    with torch.no_grad():
        for layer, seed in zip(model, (1, 2)):
            n, k = layer.weight.shape
            left, right = torch.randn(n, 4, generator=seeded(seed)), torch.randn(4, k, generator=seeded(seed + 2))
            layer.weight.copy_(left @ right)
    graph, result = factorize(model, (torch.randn(3, 64),), energy=1.0)
    layers = result.stats["layers"]
    assert [layers[name]["rank"] for name in ("0.weight", "1.weight")] == [4, 4]
    assert layers["1.weight"]["flops"] == [2 * 3 * 96 * 64, 2 * 3 * 4 * (96 + 64)]
    x = torch.randn(7, 64, generator=seeded(5))
    with torch.no_grad():
        assert relative_error(graph(x), model(x)) <= 1e-5


def test_param_ratio_sets_each_rank_and_matches_a_reference_truncated_svd():
    torch.manual_seed(4)
    model = MLP((64, 96, 64)).eval()
    example = (torch.randn(5, 64),)
    graph, result = factorize(model, example, param_ratio=0.5)
    expected_rank = int(0.5 * 96 * 64 / (96 + 64))  # the largest r with r (N + K) <= 0.5 N K
    reference = copy_model(model)
    with torch.no_grad():
        for i, layer in enumerate(reference.layers):
            assert result.stats["layers"][f"layers.{i}.weight"]["rank"] == expected_rank
            u, s, vh = torch.linalg.svd(layer.weight.double(), full_matrices=False)
            layer.weight.copy_((u[:, :expected_rank] * s[:expected_rank]) @ vh[:expected_rank])
    x = torch.randn(9, 64, generator=seeded(5))
    with torch.no_grad():
        assert relative_error(graph(x), reference(x)) <= 1e-5  # same truncation, float32 rounding only
    before, after = result.stats["layer_params"]
    assert after / before <= 0.5
    shapes = sorted(tuple(w.shape) for w in analysis.layer_weights(graph).values())
    assert shapes == sorted([(expected_rank, 64), (96, expected_rank), (expected_rank, 96), (64, expected_rank)])
    original_flops = analysis.total_flops(capture(copy_model(model), example))
    layer_flops = result.stats["layers"]["layers.0.weight"]["flops"]
    assert layer_flops[1] < layer_flops[0]
    assert analysis.total_flops(graph) < original_flops


def test_energy_picks_the_smallest_rank_that_keeps_it():
    torch.manual_seed(6)
    model = MLP((64, 256, 64)).eval()
    _, result = factorize(model, (torch.randn(2, 64),), energy=0.5)
    for name, layer in result.stats["layers"].items():
        s = torch.linalg.svdvals(dict(model.named_parameters())[name].double())
        kept = (s ** 2).cumsum(0) / (s ** 2).sum()
        assert kept[layer["rank"] - 1] >= 0.5 > kept[layer["rank"] - 2], name


def test_a_layer_not_worth_factorizing_is_left_alone():
    torch.manual_seed(7)
    model = MLP((32, 32)).eval()  # a random square weight needs nearly full rank for 99% of its energy
    graph, result = factorize(model, (torch.randn(2, 32),), energy=0.99)
    assert not result.changed and "layers.0.weight" in result.stats["left"]
    assert "would not lower its FLOPs" in result.stats["left"]["layers.0.weight"]
    x = torch.randn(4, 32, generator=seeded(8))
    assert torch.equal(graph(x), model(x))


def test_skip_patterns_leave_layers_as_they_are():
    torch.manual_seed(9)
    model = MLP((64, 96, 64)).eval()
    graph, result = factorize(model, (torch.randn(2, 64),), param_ratio=0.3, skip=("layers.1.*",))
    assert list(result.stats["layers"]) == ["layers.0.weight"]
    assert torch.equal(graph.param("layers.1.weight"), model.layers[1].weight)


def test_gpt2_conv1d_layers_are_factorized():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64, n_positions=32, use_cache=False,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 64, (2, 7), generator=seeded(10))
    graph, result = factorize(model, (ids,), param_ratio=0.4)
    # c_attn, attn.c_proj, c_fc, mlp.c_proj; the output layer is tied to the embedding and stays
    assert result.stats["factorized"] == 4
    fresh = torch.randint(0, 64, (3, 9), generator=seeded(11))
    assert graph(fresh).logits.shape == model(fresh).logits.shape
    assert torch.isfinite(graph(fresh).logits).all()


@pytest.mark.parametrize("params, fragment", [
    ({}, "exactly one of energy"),
    ({"energy": 0.8, "param_ratio": 0.5}, "exactly one of energy"),
    ({"energy": 0.0}, "energy must be in (0.0, 1.0]"),
    ({"energy": 1.2}, "energy must be in (0.0, 1.0]"),
    ({"param_ratio": 1.0}, "param_ratio must be in (0.0, 1.0)"),
    ({"energy": "most"}, "expected"),
    ({"rank": 8}, "has no parameter 'rank'"),
])
def test_bad_params_are_refused_with_the_name_and_rule(params, fragment):
    with pytest.raises(ParamError) as info:
        get_pass("lowrank")(**params)
    assert fragment in str(info.value)


def anisotropic_inputs(rows: int, seed: int) -> torch.Tensor:
    """Rows [rows, 64] whose spread falls by three orders of magnitude across random directions, as
    transformer activations (a few outlier channels, most nearly quiet) do."""
    directions, _ = torch.linalg.qr(torch.randn(64, 64, generator=seeded(20)))
    spread = torch.logspace(0, -3, 64)
    return (torch.randn(rows, 64, generator=seeded(seed)) * spread) @ directions.T


def test_calibration_whitened_truncation_beats_plain_svd_at_the_same_rank():
    torch.manual_seed(12)
    model = MLP((64, 96, 64)).eval()
    example = (anisotropic_inputs(4, seed=21),)
    calibration = [(anisotropic_inputs(256, seed=22 + i),) for i in range(2)]
    plain, plain_result = factorize(model, example, param_ratio=0.3)
    whitened, whitened_result = factorize(model, example, calibration=calibration, param_ratio=0.3)
    assert whitened_result.stats["whitened"] and not plain_result.stats["whitened"]
    assert any("no calibration" in note for note in plain_result.notes)
    ranks = {name: layer["rank"] for name, layer in whitened_result.stats["layers"].items()}
    assert ranks == {name: layer["rank"] for name, layer in plain_result.stats["layers"].items()}
    fresh = anisotropic_inputs(512, seed=30)  # same distribution, rows never calibrated on
    with torch.no_grad():
        reference = model(fresh)
        plain_error = relative_error(plain(fresh), reference)
        whitened_error = relative_error(whitened(fresh), reference)
    print(f"relative output error at param_ratio=0.3: plain SVD {plain_error:.4f}, whitened {whitened_error:.4f}")
    assert whitened_error < 0.5 * plain_error

    # the first layer sees the calibration rows themselves: its truncation is the best rank-r weight for
    # their outputs (Eckart-Young on W X^T: project W onto the top r left singular vectors of W X^T)
    x = torch.cat([batch[0] for batch in calibration]).double()
    w = model.layers[0].weight.detach().double()
    rank = ranks["layers.0.weight"]
    u = torch.linalg.svd(w @ x.T, full_matrices=False)[0][:, :rank]
    best = float(((u @ u.T @ w - w) @ x.T).norm() / (w @ x.T).norm())
    tensors = whitened.tensors()
    ours = tensors["layers.0.weight_lowrank_out"].double() @ tensors["layers.0.weight_lowrank_in"].double()
    achieved = float(((ours - w) @ x.T).norm() / (w @ x.T).norm())
    assert best <= achieved <= best * 1.01  # the damping of X^T X moves the optimum by well under 1%


def test_with_calibration_energy_is_the_fraction_of_output_energy_kept():
    torch.manual_seed(13)
    model = MLP((64, 96, 64)).eval()
    calibration = [(anisotropic_inputs(256, seed=40),)]
    _, result = factorize(model, calibration[0], calibration=calibration, energy=0.9)
    x = calibration[0][0].double()
    w = model.layers[0].weight.detach().double()
    s = torch.linalg.svdvals(w @ x.T)
    kept = (s ** 2).cumsum(0) / (s ** 2).sum()
    layer = result.stats["layers"]["layers.0.weight"]
    assert layer["energy"] >= 0.9
    # the damping adds d ||W||^2 to the total ||W X^T||^2, so each kept fraction moves by at most its share
    hessian = x.T @ x
    added = DAMPING * float(hessian.diagonal().mean()) * float(w.norm() ** 2)
    shift = added / (float((s ** 2).sum()) + added)
    assert kept[layer["rank"] - 1] >= 0.9 - shift and kept[layer["rank"] - 2] < 0.9 + shift


def test_layers_fitted_to_fewer_rows_than_input_channels_are_named():
    # 32 calibration rows for 64 input channels: X^T X is singular, the whitened fit is exact on those
    # rows and free elsewhere, and the fidelity check (on the same rows) cannot see it
    torch.manual_seed(14)
    model = MLP((64, 96, 64)).eval()
    few = [(anisotropic_inputs(16, seed=50 + i),) for i in range(2)]
    _, result = factorize(model, few[0], calibration=few, energy=0.9)
    (note,) = [n for n in result.notes if "fewer calibration rows" in n]
    assert "(as few as 32)" in note and "(up to 96)" in note and "layers.0.weight" in note and "layers.1.weight" in note
    enough = [(anisotropic_inputs(128, seed=60 + i),) for i in range(2)]
    _, result = factorize(model, enough[0], calibration=enough, energy=0.9)
    assert not [n for n in result.notes if "fewer calibration rows" in n]


def test_a_factorized_model_saved_and_loaded_gives_identical_outputs(tmp_path):
    torch.manual_seed(15)
    model = MLP((64, 96, 64)).eval()
    calibration = [(anisotropic_inputs(128, seed=70 + i),) for i in range(2)]
    compiled = bevel.compile(model, "lowrank(param_ratio=0.3)", example_inputs=calibration[0],
                             calibration=calibration)
    assert compiled.report["lowrank"].stats["factorized"] == 2
    compiled.save(str(tmp_path / "artifact"))
    loaded = bevel.load(str(tmp_path / "artifact"))
    fresh = anisotropic_inputs(7, seed=80)
    with torch.no_grad():
        assert torch.equal(loaded(fresh), compiled(fresh))
