"""CPU linears on oneDNN: the kernel against ``F.linear``, the choice per shape, the runner sharing the
graph's weights, what save/load and ONNX export see.

Timing never decides a test: the choice is checked with ``onednn_speedup`` replaced by fixed figures
(or forced with BEVEL_CPU_LINEAR); what the two libraries measure is in ``benchmarks/``.
"""

from __future__ import annotations

import json
import os

import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

import bevel
from bevel.codegen import cpu_linear
from bevel.codegen.cpu_linear import CHOICE_VARIABLE, cpu_runner, onednn_linear
from bevel.errors import BevelError
from bevel.ir import capture

ONEDNN = torch.ops.mkldnn._linear_pointwise.default
LINEAR = torch.ops.aten.linear.default


class TwoShapes(torch.nn.Module):
    """Linears of two shapes: 16 -> 32 (twice, one without bias) and 32 -> 16."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 32)
        self.up_again = torch.nn.Linear(16, 32, bias=False)
        self.down = torch.nn.Linear(32, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x) + self.up_again(x)))


def targets(module: torch.fx.GraphModule) -> list:
    return [n.target for n in module.graph.nodes if n.target in (LINEAR, ONEDNN)]


@pytest.fixture
def no_forcing(monkeypatch):
    monkeypatch.delenv(CHOICE_VARIABLE, raising=False)


@pytest.mark.parametrize("shape", [(5, 40), (3, 7, 40), (2, 3, 4, 40), (0, 40), (3, 0, 40)])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_equals_f_linear(shape, bias):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=generator)
    weight, b = torch.randn(24, 40, generator=generator), torch.randn(24, generator=generator) if bias else None
    # the same float32 products summed in another order: rounding differs by a few ulps of the sums
    torch.testing.assert_close(onednn_linear(x, weight, b), F.linear(x, weight, b), rtol=1e-5, atol=1e-5)
    transposed = torch.randn(40, 6, generator=generator).t()  # a non-contiguous input
    torch.testing.assert_close(onednn_linear(transposed, weight, b), F.linear(transposed, weight, b),
                               rtol=1e-5, atol=1e-5)


def test_each_shape_takes_the_kernel_measured_faster(monkeypatch, no_forcing):
    graph = capture(TwoShapes().eval(), (torch.randn(4, 16),))
    timed = []

    def speedup(rows, inputs, outputs):
        timed.append((rows, inputs, outputs))
        return 1.3 if outputs == 32 else cpu_linear.ONEDNN_MIN_SPEEDUP - 0.01

    monkeypatch.setattr(cpu_linear, "onednn_speedup", speedup)
    runner, choices = cpu_runner(graph.module)
    # one timing per distinct shape (with or without a bias), at the example inputs' rows
    assert sorted(timed) == [(4, 16, 32), (4, 32, 16)]
    assert {(c.key, c.kernel) for c in choices} == {((4, 16, 32), "onednn"), ((4, 32, 16), "aten")}
    assert targets(runner) == [ONEDNN, ONEDNN, LINEAR]
    assert targets(graph.module) == [LINEAR] * 3  # the graph itself is left as it is
    # the runner shares the graph's weights: no copy, and a later change to one shows in the other
    assert {p.data_ptr() for p in runner.parameters()} == {p.data_ptr() for p in graph.module.parameters()}
    x = torch.randn(9, 16)
    torch.testing.assert_close(runner(x), graph.module(x), rtol=1e-5, atol=1e-5)


def test_nothing_faster_leaves_the_graph_module_itself(monkeypatch, no_forcing):
    graph = capture(TwoShapes().eval(), (torch.randn(4, 16),))
    monkeypatch.setattr(cpu_linear, "onednn_speedup", lambda *shape: 1.0)
    runner, choices = cpu_runner(graph.module)
    assert runner is graph.module and {c.kernel for c in choices} == {"aten"}


def test_timings_are_kept_for_the_process(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_linear, "_speedups", {})
    monkeypatch.setattr(cpu_linear, "REPEATS", 1)
    real_linear = cpu_linear.onednn_linear

    def counted(*args):
        calls.append(1)
        return real_linear(*args)

    monkeypatch.setattr(cpu_linear, "onednn_linear", counted)
    first = cpu_linear.onednn_speedup(8, 16, 32)
    assert first > 0 and len(calls) == cpu_linear.WARMUP + 1
    assert cpu_linear.onednn_speedup(8, 16, 32) == first and len(calls) == cpu_linear.WARMUP + 1
    # products of other sizes are timed at one of two row counts, so compiles at other sizes choose alike
    assert cpu_linear.onednn_speedup(40, 16, 32) == first and len(calls) == cpu_linear.WARMUP + 1
    cpu_linear.onednn_speedup(1600, 16, 32)
    cpu_linear.onednn_speedup(3200, 16, 32)
    assert len(calls) == 2 * (cpu_linear.WARMUP + 1)


def test_a_bad_choice_variable_is_named(monkeypatch):
    graph = capture(TwoShapes().eval(), (torch.randn(4, 16),))
    monkeypatch.setenv(CHOICE_VARIABLE, "fastest")
    with pytest.raises(BevelError, match=f"{CHOICE_VARIABLE}='fastest'.*'auto'.*'aten'.*'onednn'"):
        cpu_runner(graph.module)


@pytest.fixture
def compiled_on_onednn(monkeypatch):
    """TwoShapes compiled with every linear forced onto oneDNN."""
    monkeypatch.setenv(CHOICE_VARIABLE, "onednn")
    torch.manual_seed(0)
    model = TwoShapes().eval()
    return model, bevel.compile(model, "cleanup", example_inputs=(torch.randn(4, 16),))


def test_a_compiled_module_runs_its_linears_on_onednn_and_exports_aten(compiled_on_onednn, tmp_path):
    model, compiled = compiled_on_onednn
    assert {(c.key, c.kernel) for c in compiled.cpu_linears} == {((4, 16, 32), "onednn"), ((4, 32, 16), "onednn")}
    x = torch.randn(6, 16)
    got = compiled(x)
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)
    assert targets(compiled._runner) == [ONEDNN] * 3 and targets(compiled.graph_module) == [LINEAR] * 3
    # one copy of the weights in the module's state
    assert set(compiled.state_dict()) == {f"graph_module.{n}" for n in compiled.graph_module.state_dict()}
    path = compiled.export_onnx(str(tmp_path / "model.onnx"))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(onnx_out), got, rtol=1e-5, atol=1e-5)


def test_a_loaded_artifact_runs_the_kernels_it_was_saved_with(compiled_on_onednn, monkeypatch, tmp_path):
    _, compiled = compiled_on_onednn
    path = compiled.save(str(tmp_path / "art"))
    with open(os.path.join(path, "manifest.json")) as f:
        assert sorted(json.load(f)["cpu_linears"]) == [[4, 16, 32, "onednn"], [4, 32, 16, "onednn"]]
    monkeypatch.delenv(CHOICE_VARIABLE)

    def no_timing(*shape):
        raise AssertionError("a loaded artifact timed a shape its manifest gives")

    monkeypatch.setattr(cpu_linear, "onednn_speedup", no_timing)
    loaded = bevel.load(path)
    assert [(c.key, c.kernel) for c in loaded.cpu_linears] == [(c.key, c.kernel) for c in compiled.cpu_linears]
    x = torch.randn(5, 16)
    assert torch.equal(loaded(x), compiled(x))


def test_a_decoder_times_its_decode_step_at_one_token_per_sequence(monkeypatch, no_forcing, tmp_path):
    from tests.decoders import hf_greedy, padded_prompts, small_causal_lm

    model = small_causal_lm("llama")
    ids, mask = padded_prompts([5, 3, 6])
    timed = []

    def speedup(rows, inputs, outputs):
        timed.append(rows)
        return 1.2  # oneDNN everywhere

    monkeypatch.setattr(cpu_linear, "onednn_speedup", speedup)
    compiled = bevel.compile(model, "cleanup", example_inputs=(ids, mask))
    # the prefill's linears multiply the example's 3 x 6 tokens, the decode step's 3 rows, one per prompt
    assert set(timed) == {18, 3} and {c.rows for c in compiled.cpu_linears} == {18, 3}
    for graph in (compiled.prefill_graph, compiled.decode_graph):
        assert targets(graph) and set(targets(graph)) == {ONEDNN}
    assert set(targets(compiled.graph_module)) == {LINEAR}
    # the same greedy tokens as the model's own generate (the two libraries' rounding moves no argmax here)
    generated = compiled.generate(ids, max_new_tokens=8, attention_mask=mask, eos_token_id=None)
    assert torch.equal(generated, hf_greedy(model, ids, mask, 8))
    loaded = bevel.load(compiled.save(str(tmp_path / "lm")))
    assert set(targets(loaded.decode_graph)) == {ONEDNN}
    assert torch.equal(loaded.generate(ids, max_new_tokens=8, attention_mask=mask, eos_token_id=None), generated)


def test_a_change_of_dtype_is_refused_and_leaves_the_module_as_it_was(compiled_on_onednn):
    model, compiled = compiled_on_onednn
    for convert in (lambda m: m.to(torch.float64), lambda m: m.half(), lambda m: m.bfloat16()):
        with pytest.raises(BevelError, match="computes in float32, the dtype it was captured in, and cannot be "
                                             "converted to (float64|float16|bfloat16)"):
            convert(compiled)
    assert compiled.float() is compiled  # no change of dtype: nothing to refuse
    assert {p.dtype for p in compiled.state_dict().values()} == {torch.float32}
    x = torch.randn(6, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer, the non-persistent ones too (which ``state_dict`` leaves
    out: a rotary embedding's frequencies)."""
    named = dict(module.named_parameters()) | dict(module.named_buffers())
    return {name: t.detach().clone() for name, t in named.items()}


def restore(module: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Write :func:`tensors`' copies back (after ``to_empty``, whose memory is uninitialized)."""
    named = dict(module.named_parameters()) | dict(module.named_buffers())
    assert named.keys() == saved.keys()
    with torch.no_grad():
        for name, t in named.items():
            t.copy_(saved[name])


class Positions(torch.nn.Module):
    """TwoShapes plus a tensor the graph makes itself (on the capture's device) and a buffer."""

    def __init__(self):
        super().__init__()
        self.inner = TwoShapes()
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 16))

    def forward(self, x):
        return self.inner(x) * self.scale + torch.arange(x.shape[0], dtype=x.dtype, device=x.device)[:, None]


def test_moving_the_weights_moves_what_runs_and_back_on_the_cpu_the_kernels_chosen(monkeypatch):
    monkeypatch.setenv(CHOICE_VARIABLE, "onednn")
    torch.manual_seed(0)
    model = Positions().eval()
    compiled = bevel.compile(model, "cleanup", example_inputs=(torch.randn(4, 16),))
    x = torch.randn(6, 16)
    before, state = compiled(x), tensors(compiled)
    compiled.to("meta")  # another device, as a GPU is: the graph makes its tensors there, on aten's kernels
    assert compiled._runner is compiled.graph_module and compiled.cpu_linears == []
    out = compiled(x.to("meta"))
    assert out.device.type == "meta" and out.shape == (6, 16)
    monkeypatch.delenv(CHOICE_VARIABLE)

    def no_timing(*shape):
        raise AssertionError("a module moved back to the CPU timed a shape it had chosen a kernel for")

    monkeypatch.setattr(cpu_linear, "onednn_speedup", no_timing)
    compiled.to_empty(device="cpu")  # back to the CPU (a meta tensor has no values to copy back)
    restore(compiled, state)
    assert targets(compiled._runner) == [ONEDNN] * 3
    assert {(c.key, c.kernel) for c in compiled.cpu_linears} == {((4, 16, 32), "onednn"), ((4, 32, 16), "onednn")}
    assert torch.equal(compiled(x), before)


def test_a_decoder_moved_away_and_back_generates_as_before_on_its_kernels(monkeypatch):
    from tests.decoders import hf_greedy, padded_prompts, small_causal_lm

    monkeypatch.setenv(CHOICE_VARIABLE, "onednn")
    model = small_causal_lm("llama")
    ids, mask = padded_prompts([5, 3, 6])
    compiled = bevel.compile(model, "cleanup", example_inputs=(ids, mask))
    with pytest.raises(BevelError, match="cannot be converted to bfloat16"):
        compiled.bfloat16()
    state = tensors(compiled)
    compiled.to("meta")
    assert set(targets(compiled.decode_graph)) == {LINEAR} and compiled.device.type == "meta"
    monkeypatch.delenv(CHOICE_VARIABLE)
    compiled.to_empty(device="cpu")
    restore(compiled, state)
    for graph in (compiled.prefill_graph, compiled.decode_graph):
        assert set(targets(graph)) == {ONEDNN}
    generated = compiled.generate(ids, max_new_tokens=8, attention_mask=mask, eos_token_id=None)
    assert torch.equal(generated, hf_greedy(model, ids, mask, 8))
