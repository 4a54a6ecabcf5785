"""Tests for the torch.compile backend: ``torch.compile(model, backend="bevel", options={"passes": ...})``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch._dynamo

import bevel
from bevel.compiler.backend import BevelCompiledGraph, bevel_backend, reports
from bevel.compiler.dynamo_graph import weight_name
from tests.models_zoo import seeded

PRUNE = "prune.magnitude(sparsity=0.5)"


class MLP(torch.nn.Module):
    """Two Linear layers and a buffer: parameters and state both reach the backend."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 8)
        self.register_buffer("scale", torch.linspace(0.5, 2.0, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))) * self.scale


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts and ends with dynamo's caches empty, so no compiled graph leaks between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


def spy_backend(graphs: list, compiled: list):
    """The bevel backend, recording every graph dynamo hands it and every callable it returns."""
    def backend(gm, example_inputs, **kwargs):
        graphs.append((gm, list(example_inputs)))
        result = bevel_backend(gm, example_inputs, **kwargs)
        compiled.append(result)
        return result
    return backend


def state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_state_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} was modified"


# -- (a) cleanup on a small MLP ---------------------------------------------------------------------

def test_cleanup_matches_eager(mlp):
    x = torch.randn(4, 16, generator=seeded(1))
    compiled = torch.compile(mlp, backend="bevel", options={"passes": "cleanup"})
    with torch.no_grad():
        expected = mlp(x)
    # cleanup does not change the arithmetic: only float reordering could move the result.
    torch.testing.assert_close(compiled(x), expected, atol=1e-6, rtol=0)


def test_no_options_means_cleanup(mlp):
    x = torch.randn(3, 16, generator=seeded(2))
    graphs, compiled = [], []
    out = torch.compile(mlp, backend=spy_backend(graphs, compiled))(x)
    torch.testing.assert_close(out, mlp(x).detach(), atol=1e-6, rtol=0)
    (module,) = compiled[0].compiled_by_scalars.values()
    assert module.pipeline == "cleanup"


# -- (b) weights as graph inputs and as graph attributes --------------------------------------------

@pytest.mark.parametrize("weights_as_attributes", [False, True], ids=["weights-as-inputs", "weights-as-get_attr"])
def test_prune_sees_the_weights(mlp, weights_as_attributes):
    # torch 2.14 always inlines nn modules (inline_inbuilt_nn_modules is a deprecated no-op) and lifts
    # weights as graph inputs; install_free_tensors makes dynamo hold them as get_attr of the graph instead.
    x = torch.randn(5, 16, generator=seeded(3))
    before = state_copy(mlp)
    graphs, compiled = [], []
    with torch._dynamo.config.patch(install_free_tensors=weights_as_attributes):
        out = torch.compile(mlp, backend=spy_backend(graphs, compiled), options={"passes": PRUNE})(x)
    (gm, _), = graphs
    get_attrs = [n for n in gm.graph.nodes if n.op == "get_attr"]
    weight_inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and "_parameters_" in n.name]
    assert (len(get_attrs), len(weight_inputs)) == ((5, 0) if weights_as_attributes else (0, 4))

    reference = bevel.compile(mlp, PRUNE, example_inputs=(x,))
    torch.testing.assert_close(out, reference(x), atol=1e-6, rtol=0)
    assert (out - mlp(x)).abs().max() > 1e-2  # pruning half the weights does change the output

    (module,) = compiled[0].compiled_by_scalars.values()
    stats = module.report.passes[0].stats
    assert module.report.passes[0].status == "applied"
    assert stats["sparsity"] == pytest.approx(0.5, abs=0.01)
    # The weights keep the model's own names, so skip patterns written for bevel.compile still apply.
    assert set(stats["per_layer_sparsity"]) == {"fc1.weight", "fc2.weight"}
    assert stats == reference.report.passes[0].stats
    assert_state_unchanged(mlp, before)


def test_skip_pattern_uses_model_names(mlp):
    x = torch.randn(2, 16, generator=seeded(4))
    graphs, compiled = [], []
    passes = "prune.magnitude(sparsity=0.5, skip=['fc2.*'])"
    torch.compile(mlp, backend=spy_backend(graphs, compiled), options={"passes": passes})(x)
    (module,) = compiled[0].compiled_by_scalars.values()
    assert set(module.report.passes[0].stats["per_layer_sparsity"]) == {"fc1.weight"}


def test_the_reports_of_compiled_graphs_are_kept_for_the_user(mlp):
    torch._dynamo.reset()
    x = torch.randn(3, 16, generator=seeded(5))
    before = {id(report) for report in reports()}  # the deque keeps them alive: their ids stay theirs
    torch.compile(mlp, backend="bevel", options={"passes": "cleanup | prune.magnitude(sparsity=0.3)"})(x)
    (report,) = [report for report in reports() if id(report) not in before]
    assert report.pipeline == "cleanup | prune.magnitude(sparsity=0.3)"
    assert [p.name for p in report.passes] == ["cleanup", "prune.magnitude(sparsity=0.3)"]
    assert report.passes[1].status == "applied"


# -- (c) a second shape: dynamo's dynamic recompile -------------------------------------------------

def test_dynamic_recompile_matches(mlp):
    graphs, compiled = [], []
    fn = torch.compile(mlp, backend=spy_backend(graphs, compiled), options={"passes": PRUNE})
    x2, x3, x7 = (torch.randn(b, 16, generator=seeded(b)) for b in (2, 3, 7))
    reference = bevel.compile(mlp, PRUNE, example_inputs=(x2,))
    for x in (x2, x3, x7):
        torch.testing.assert_close(fn(x), reference(x), atol=1e-6, rtol=0)
    assert len(graphs) == 2  # batch 7 reuses the dynamic graph compiled for batch 3
    dynamic_gm, dynamic_inputs = graphs[1]
    assert any(isinstance(v, torch.SymInt) for v in dynamic_inputs)
    slots = compiled[1].module.slots
    assert [(s.kind, s.index, s.dim) for s in slots if s.kind == "size"] == [("size", 0, 0)]


def test_a_model_in_training_mode_is_refused_and_left_as_it_was():
    """Dynamo traces dropout and batch norm as the model's mode has them; the backend cannot put the
    model in eval mode as bevel.compile does with its copy, so it says what to do."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(8))
    before = state_copy(model)
    with pytest.raises(bevel.BevelError, match=r"training mode \(batch_norm, dropout in training.*model\.eval\(\)"):
        torch.compile(model, backend="bevel")(torch.randn(4, 8))
    assert_state_unchanged(model, before)
    assert model.training
    model.eval()
    x = torch.randn(4, 8, generator=seeded(3))
    torch.testing.assert_close(torch.compile(model, backend="bevel")(x), model(x), atol=1e-6, rtol=0)


def test_an_empty_batch_gives_an_empty_output_as_eager_does(mlp):
    """Dynamo compiles a graph for the batch of size 0; its fidelity check has no rows to compare."""
    fn = torch.compile(mlp, backend="bevel")
    fn(torch.randn(4, 16, generator=seeded(1)))
    empty = torch.randn(0, 16)
    assert fn(empty).shape == mlp(empty).shape == (0, 8)
    x = torch.randn(5, 16, generator=seeded(2))
    torch.testing.assert_close(fn(x), mlp(x), atol=1e-6, rtol=0)


def test_python_int_input_recompiles_per_value():
    # A Python int argument becomes a SymInt graph input on dynamo's recompile; torch.export fixes its
    # value, so the backend compiles once per value it sees.
    def scaled(x: torch.Tensor, n: int) -> torch.Tensor:
        return x * n + 1

    graphs, compiled = [], []
    fn = torch.compile(scaled, backend=spy_backend(graphs, compiled))
    x = torch.randn(3, 4, generator=seeded(5))
    for n in (2, 3, 4, 3):
        torch.testing.assert_close(fn(x, n), x * n + 1, atol=1e-6, rtol=0)
    assert len(graphs) == 2 and isinstance(graphs[1][1][1], torch.SymInt)
    assert list(compiled[1].compiled_by_scalars) == [(3,), (4,)]


def test_graph_break_compiles_each_graph(mlp):
    class Broken(torch.nn.Module):
        def __init__(self, inner: MLP) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.inner.fc1(x)
            torch._dynamo.graph_break()
            return self.inner.fc2(torch.relu(y)) * self.inner.scale

    model = Broken(mlp)
    x = torch.randn(3, 16, generator=seeded(6))
    graphs, compiled = [], []
    out = torch.compile(model, backend=spy_backend(graphs, compiled), options={"passes": PRUNE})(x)
    assert len(graphs) == 2
    reports = [next(iter(c.compiled_by_scalars.values())).report for c in compiled]
    assert [set(r.passes[0].stats["per_layer_sparsity"]) for r in reports] == [{"inner.fc1.weight"},
                                                                               {"inner.fc2.weight"}]
    assert all(re.fullmatch(r"torch\.compile graph \d+/\d+", r.model) for r in reports)
    assert out.shape == (3, 8) and torch.isfinite(out).all()


# -- (d) registration -------------------------------------------------------------------------------

def run_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env=env)


def test_entry_point_works_without_importing_bevel():
    result = run_python("""
        import sys
        import torch
        import torch._dynamo
        assert "bevel" in torch._dynamo.list_backends(), torch._dynamo.list_backends()
        assert "bevel" not in sys.modules  # listing finds the entry point without importing bevel
        model = torch.nn.Linear(4, 2)
        x = torch.randn(3, 4)
        out = torch.compile(model, backend="bevel", options={"passes": "prune.magnitude(sparsity=0.5)"})(x)
        assert "bevel" in sys.modules
        assert out.shape == (3, 2)
        assert int((torch.compile(model, backend="bevel")(x) - model(x)).abs().max() > 1e-6) == 0
        import bevel  # importing afterwards must not register the name twice
        bevel.compiler.backend.register()
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_import_registers_without_entry_point():
    # bevel used from a source tree that was never pip-installed: no entry point, so import registers it.
    result = run_python("""
        import importlib.metadata as metadata
        real = metadata.entry_points
        def without_bevel(**kwargs):
            found = real(**kwargs)
            if kwargs.get("group") == "torch_dynamo_backends":
                return metadata.EntryPoints(ep for ep in found if ep.name != "bevel")
            return found
        metadata.entry_points = without_bevel
        import torch
        import torch._dynamo
        import bevel
        bevel.compiler.backend.register()  # a second call is harmless
        assert "bevel" in torch._dynamo.list_backends()
        model = torch.nn.Linear(4, 2)
        x = torch.randn(3, 4)
        assert (torch.compile(model, backend="bevel")(x) - model(x)).abs().max() <= 1e-6
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


# -- (e) the main check: MiniLM with real weights ---------------------------------------------------

# Measured: the two paths give bit-identical outputs (max abs diff 0.0 on both outputs, both batches):
# they prune the same weights to the same zeros and run the same aten ops. The tolerance leaves room
# for float reordering only (a different op order on another torch build); a pruning difference
# would move outputs by more than 1e-2.
MINILM_ATOL = 1e-5


def test_minilm_matches_bevel_compile(minilm, minilm_inputs, fresh_sentences):
    before = state_copy(minilm)
    reference = bevel.compile(minilm, PRUNE, example_inputs=minilm_inputs)
    compiled = torch.compile(minilm, backend="bevel", options={"passes": PRUNE})
    for inputs in (minilm_inputs, fresh_sentences):
        out, expected = compiled(*inputs), reference(*inputs)
        for name in ("last_hidden_state", "pooler_output"):
            torch.testing.assert_close(getattr(out, name), getattr(expected, name), atol=MINILM_ATOL, rtol=0,
                                       msg=lambda m: f"{name}: {m}")
    with torch.no_grad():
        eager = minilm(*fresh_sentences).last_hidden_state
    assert (out.last_hidden_state - eager).abs().max() > 1e-2  # the pruning did happen
    assert_state_unchanged(minilm, before)


def test_dynamic_true_captures_a_bert_and_packs_its_sequences():
    """With ``dynamic=True`` dynamo passes a BERT's eps, dropout p and attention scaling as 0-dim
    tensors read with ``.item()`` (baked in as numbers), and gives ``input_ids`` and
    ``attention_mask`` one length symbol (kept as one named Dim, so the passes see the mask as a
    padding mask of the same tokens). Both compile paths pack alike; exact, since the graphs agree."""
    from tests.passes.token_reduction import padded_ids, small_bert

    bert = small_bert()
    before = state_copy(bert.model)
    passes = "cleanup | tome(r=2, pack=true)"
    compiled = torch.compile(bert.model, dynamic=True, backend="bevel", options={"passes": passes})
    reference = bevel.compile(bert.model, passes, example_inputs=bert.example)
    for inputs in (bert.example, padded_ids(5, 9, [9, 3, 4, 2, 6], seed=2)):
        with torch.no_grad():
            out, expected = compiled(*inputs), reference(*inputs)
        torch.testing.assert_close(out.last_hidden_state, expected["last_hidden_state"], atol=1e-6, rtol=0)
        torch.testing.assert_close(out.pooler_output, expected["pooler_output"], atol=1e-6, rtol=0)
    assert_state_unchanged(bert.model, before)


# -- (f) errors -------------------------------------------------------------------------------------

def test_bad_pipeline_is_a_pipeline_error(mlp):
    x = torch.randn(2, 16)
    compiled = torch.compile(mlp, backend="bevel", options={"passes": "cleanup | prune.magnitud(sparsity=0.5)"})
    with pytest.raises(bevel.PipelineError) as caught:
        compiled(x)
    message = str(caught.value)
    assert "unknown pass 'prune.magnitud'" in message and "prune.magnitude" in message
    assert "^" in message  # the caret under the fault
    assert mlp(x).shape == (2, 8)  # the model still runs eagerly


def test_bad_parameter_is_a_param_error(mlp):
    compiled = torch.compile(mlp, backend="bevel", options={"passes": "prune.magnitude(sparsity=1.5)"})
    with pytest.raises(bevel.ParamError) as caught:
        compiled(torch.randn(2, 16))
    assert caught.value.key == "sparsity" and "1.5" in str(caught.value)


def test_unknown_option_lists_accepted_keys(mlp):
    compiled = torch.compile(mlp, backend="bevel", options={"pases": "cleanup"})
    with pytest.raises(bevel.BevelError) as caught:
        compiled(torch.randn(2, 16))
    message = str(caught.value)
    assert "'pases'" in message and "did you mean 'passes'" in message
    for key in ("passes", "max_fidelity_drop", "device"):
        assert key in message


def test_a_pipeline_given_as_the_options_themselves_is_refused(mlp):
    compiled = torch.compile(mlp, backend="bevel", options="cleanup")
    with pytest.raises(bevel.BevelError, match=r"options=\.\.\.\) for the bevel backend must be a dict such as "
                                               r"\{'passes': 'cleanup \| \.\.\.'\}, got a str: 'cleanup'"):
        compiled(torch.randn(2, 16))


def test_bad_fidelity_budget_is_refused(mlp):
    compiled = torch.compile(mlp, backend="bevel", options={"max_fidelity_drop": 5})
    with pytest.raises(bevel.ParamError, match="max_fidelity_drop"):
        compiled(torch.randn(2, 16))


def test_error_while_compiling_reaches_the_user(mlp, monkeypatch):
    # bevel.compile runs on the graph's first call, outside dynamo's compile: its errors pass unwrapped.
    def fail(self, inputs):
        raise bevel.CaptureError("could not capture the graph")

    monkeypatch.setattr(BevelCompiledGraph, "compile", fail)
    with pytest.raises(bevel.CaptureError, match="could not capture the graph"):
        torch.compile(mlp, backend="bevel")(torch.randn(2, 16))


# -- names ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source, expected", [
    ("L['self']._modules['embeddings']._modules['word_embeddings']._parameters['weight']",
     "embeddings.word_embeddings.weight"),
    ("L['self']._modules['layers']._modules['0']._parameters['bias']", "layers.0.bias"),
    ("L['self']._buffers['position_ids']", "position_ids"),
    ("L['self'].fc1.weight", "fc1.weight"),
    ("G['table']", "table"),
    (None, "L_fallback_"),
])
def test_weight_name(source, expected):
    assert weight_name(source, "L_fallback_") in (expected, expected.strip("_"))


def test_returns_a_compiled_graph(mlp):
    graphs, compiled = [], []
    torch.compile(mlp, backend=spy_backend(graphs, compiled))(torch.randn(2, 16))
    assert isinstance(compiled[0], BevelCompiledGraph)


def test_weights_whose_names_the_wrapper_uses_get_their_own_names():
    # "slots" and "dynamo_graph" are attributes of the wrapper module: the weights move to free names.
    class Clashing(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dynamo_graph = torch.nn.Linear(4, 4)
            self.register_buffer("slots", torch.full((4,), 2.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dynamo_graph(x) * self.slots

    torch.manual_seed(0)
    model = Clashing().eval()
    graphs, compiled = [], []
    x = torch.randn(3, 4, generator=seeded(7))
    out = torch.compile(model, backend=spy_backend(graphs, compiled))(x)
    torch.testing.assert_close(out, model(x), atol=1e-6, rtol=0)
    names = {name for name, _ in compiled[0].module.named_parameters()} | \
            {name for name, _ in compiled[0].module.named_buffers()}
    assert names == {"slots_1", "dynamo_graph_1.weight", "dynamo_graph_1.bias"}, names  # the graph is left alone
