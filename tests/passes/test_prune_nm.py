"""prune.nm: exactly N non-zeros in every M-block, the kept weights, the kernel choice per layer, and
the sparse-kernel op through outputs, ONNX and a saved artifact.

Differential tolerance: pruning changes outputs by design, so the rewritten graph is compared with the
original model whose weights were pruned by an independent reference (a sort of each block); the
two compute the same linears on the same weights and must agree to float32 rounding (1e-6). With
n == m nothing is pruned and the outputs are bit-identical.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import bevel
from bevel.compiler.captured import copy_model
from bevel.errors import ParamError, PassError, PipelineError
from bevel.ir import analysis, capture
from bevel.passes import PassContext, get_pass
from bevel.passes.prune import nm
from tests.models_zoo import MLP, seeded


def prune(model, example, calibrated=True, calibration=None, **params):
    graph = capture(copy_model(model), example)
    ctx = PassContext(calibration=calibration or [example], example_inputs=example, calibrated=calibrated)
    return graph, get_pass("prune.nm")(**params).run(graph, ctx)


def bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32)
    ids = torch.randint(0, 120, (2, 7), generator=seeded(1))
    return BertModel(config).eval(), (ids, torch.ones_like(ids))


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64, n_positions=32, use_cache=False,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval(), (torch.randint(0, 64, (2, 7), generator=seeded(2)),)


def nonzeros_per_block(weight: torch.Tensor, m: int) -> torch.Tensor:
    return (weight != 0).reshape(weight.shape[0], -1, m).sum(-1)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8), (3, 16)])
def test_every_block_of_every_mlp_weight_keeps_exactly_n(n, m):
    torch.manual_seed(n * m)
    model = MLP((32, 64, 48, 16)).eval()
    graph, result = prune(model, (torch.randn(3, 32),), n=n, m=m)
    assert set(result.stats["layers"]) == {"layers.0.weight", "layers.1.weight", "layers.2.weight"}
    for name in result.stats["layers"]:
        assert (nonzeros_per_block(graph.param(name), m) == n).all(), name
    assert analysis.weight_sparsity(graph) == pytest.approx(1 - n / m)
    assert graph.lint() == []


# BERT: q, k, v, attention output, intermediate, output in each of 2 layers, and the pooler; GPT-2:
# c_attn, attn.c_proj, c_fc, mlp.c_proj (its output layer is tied to the embedding and stays dense)
@pytest.mark.parametrize("build, layers", [(bert, 13), (gpt2, 4)], ids=["bert", "gpt2"])
def test_every_targeted_transformer_weight_is_2_4(build, layers):
    model, example = build()
    graph, result = prune(model, example)
    targeted = result.stats["layers"]
    assert len(targeted) == layers
    for name in targeted:
        weight = graph.param(name)
        if build is gpt2:
            weight = weight.t()  # HF Conv1D stores [K, N]: the groups run along K, its first dimension
        assert (nonzeros_per_block(weight, 4) == 2).all(), name
    out = graph(*example)
    assert all(torch.isfinite(t).all() for t in (out.values() if hasattr(out, "values") else [out]))


def test_kept_weights_are_the_largest_of_each_block_and_outputs_follow():
    torch.manual_seed(3)
    model = MLP((16, 32, 8)).eval()
    graph, _ = prune(model, (torch.randn(2, 16),), n=2, m=4)
    reference = copy_model(model)
    with torch.no_grad():
        for layer in reference.layers:
            w = layer.weight
            blocks = w.abs().reshape(w.shape[0], -1, 4)
            smallest_two = blocks.sort(dim=-1).indices[..., :2]
            mask = torch.ones_like(blocks, dtype=torch.bool).scatter_(-1, smallest_two, False).reshape(w.shape)
            w.mul_(mask)
    for i, layer in enumerate(reference.layers):
        assert torch.equal(graph.param(f"layers.{i}.weight"), layer.weight)
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert (graph(x) - reference(x)).abs().max() <= 1e-6


def test_n_equal_to_m_changes_nothing():
    model, example = bert()
    graph, result = prune(model, example, n=4, m=4)
    assert not result.changed and result.notes == ["n = m = 4 keeps every weight: nothing pruned"]  # was "applied"
    ids = torch.randint(0, 120, (3, 9), generator=seeded(5))
    fresh = (ids, torch.ones_like(ids))
    assert torch.equal(graph(*fresh).last_hidden_state, model(*fresh).last_hidden_state)


def test_a_width_not_a_multiple_of_m_is_skipped_and_reported():
    model = MLP((16, 30, 8)).eval()
    graph, result = prune(model, (torch.randn(2, 16),), n=2, m=4)
    assert list(result.stats["layers"]) == ["layers.0.weight"]
    assert "layers.1.weight" in result.stats["skipped"]
    assert any("layers.1.weight" in note and "30" in note for note in result.notes)
    assert torch.equal(graph.param("layers.1.weight"), model.layers[1].weight)


def test_every_layer_is_reported_dense_on_the_cpu():
    model = MLP((16, 32, 8)).eval()
    _, result = prune(model, (torch.randn(2, 16),))
    for form in result.stats["layers"].values():
        assert form["kernel"] == "dense" and form["speedup"] is None and "cpu" in form["reason"]
    assert result.stats["sparse_kernel_layers"] == 0


def test_activation_importance_keeps_the_weights_of_a_loud_input_channel():
    """Channel 0's weights are the smallest of their blocks but its input is 1000x louder: Wanda keeps them."""
    layer = torch.nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(4, 8, generator=seeded(6)).abs() + 1)
        layer.weight[:, 0] = 0.1
    x = torch.randn(64, 8, generator=seeded(7))
    x[:, 0] *= 1000
    by_magnitude, _ = prune(layer, (x,), importance="magnitude")
    by_activation, _ = prune(layer, (x,), importance="activation")
    assert (by_magnitude.param("weight")[:, 0] == 0).all()
    assert (by_activation.param("weight")[:, 0] != 0).all()
    assert (nonzeros_per_block(by_activation.param("weight"), 4) == 2).all()


def test_activation_importance_without_calibration_is_refused():
    model = MLP((16, 32, 8)).eval()
    with pytest.raises(PassError, match="calibration"):
        prune(model, (torch.randn(2, 16),), calibrated=False, importance="activation")
    with pytest.raises(PipelineError, match="prune.nm.*calibration"):
        bevel.compile(model, 'prune.nm(importance="activation")', example_inputs=(torch.randn(2, 16),))


@pytest.mark.parametrize("params, fragment", [
    ({"n": 5, "m": 4}, "n must not exceed m"),
    ({"n": 0}, "n must be in [1, inf)"),
    ({"m": 0}, "m must be in [1, inf)"),
    ({"importance": "taylor"}, "is not one of 'magnitude', 'activation'"),
    ({"skip": 3}, "expected tuple"),
])
def test_bad_params_are_refused_with_the_name_and_rule(params, fragment):
    with pytest.raises(ParamError) as info:
        get_pass("prune.nm")(**params)
    assert fragment in str(info.value)


def test_the_kernel_choice_follows_the_measurement(monkeypatch):
    weight = torch.randn(64, 64, generator=seeded(8))
    weight = torch.where(nm.nm_mask(weight.abs(), 2, 4), weight, 0.0)
    cuda = torch.device("cuda")
    assert nm.choose_form(weight.bfloat16(), 32, torch.device("cpu")).kernel == "dense"
    assert "float32" in nm.choose_form(weight, 32, cuda).reason  # cuSPARSELt has no float32 2:4 kernel
    four_of_eight = torch.where(nm.nm_mask(weight.abs(), 4, 8), weight, 0.0).bfloat16()
    if not nm.is_2_4(four_of_eight):
        assert "not 2:4" in nm.choose_form(four_of_eight, 32, cuda).reason
    for measured, kernel in [(nm.SPARSE_MIN_SPEEDUP * 1.1, "sparse"), (1.0, "dense"), (0.3, "dense")]:
        monkeypatch.setattr(nm, "measure_sparse_speedup", lambda w, rows, device, r=measured: r)
        form = nm.choose_form(weight.bfloat16(), 4096, cuda)
        assert (form.kernel, form.speedup) == (kernel, measured)

    def refuses(w, rows, device):
        raise RuntimeError("shape not supported")

    monkeypatch.setattr(nm, "measure_sparse_speedup", refuses)
    form = nm.choose_form(weight.bfloat16(), 4096, cuda)
    assert form.kernel == "dense" and "shape not supported" in form.reason


@pytest.fixture(scope="module")
def sparse_kernel_model():
    """An MLP compiled with every layer sent to the sparse-kernel op, as a CUDA compile does where it
    measures sparse faster; on the CPU the op runs its dense reference."""
    patch = pytest.MonkeyPatch()
    patch.setattr(nm, "choose_form", lambda weight, rows, device: nm.LayerForm("sparse", 2.0, "forced"))
    torch.manual_seed(9)
    model = MLP((32, 64, 16)).eval()
    try:
        compiled = bevel.compile(model, "prune.nm", example_inputs=(torch.randn(4, 32),))
    finally:
        patch.undo()
    return model, compiled


def test_the_sparse_kernel_op_computes_the_pruned_linear(sparse_kernel_model):
    model, compiled = sparse_kernel_model
    entry = compiled.report["prune.nm"]
    assert entry.status == "applied" and entry.stats["sparse_kernel_layers"] == 2
    targets = [n.target for n in compiled.graph_module.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.bevel.semi_structured_linear.default) == 2
    dense, _ = prune(model, (torch.randn(4, 32),))
    x = torch.randn(7, 32, generator=seeded(10))
    assert (compiled(x) - dense(x)).abs().max() <= 1e-6


def test_the_sparse_kernel_op_exports_to_onnx_and_saves(sparse_kernel_model, tmp_path):
    _, compiled = sparse_kernel_model
    x = torch.randn(5, 32, generator=seeded(11))
    path = compiled.export_onnx(str(tmp_path / "nm.onnx"))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(out - compiled(x).numpy()).max() <= 1e-5  # ORT's own GEMM: float32 rounding of 64-term sums
    loaded = bevel.load(compiled.save(str(tmp_path / "artifact")))
    assert torch.equal(loaded(x), compiled(x))
