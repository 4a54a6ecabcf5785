"""Graph: iterate, replace, read and write weights, lint, print, networkx view, copy."""

from __future__ import annotations

import torch

from bevel.ir import capture
from tests.models_zoo import MLP, SDPABlock

aten = torch.ops.aten


def test_iterate_and_replace_nodes():
    model = MLP(dropout=0.5).eval()
    graph = capture(model, (torch.randn(2, 16),))
    dropouts = list(graph.nodes(target=aten.dropout.default))
    assert len(dropouts) == 1
    graph.replace_node(dropouts[0], dropouts[0].args[0])
    graph.refresh()
    assert not list(graph.nodes(target=aten.dropout.default))
    x = torch.randn(4, 16)
    torch.testing.assert_close(graph(x), model(x), rtol=0, atol=0)  # eval-mode dropout was the identity


def test_set_param_changes_outputs_and_keeps_parameter_kind():
    graph = capture(MLP().eval(), (torch.randn(2, 16),))
    name = "layers.0.weight"
    graph.set_param(name, torch.zeros_like(graph.param(name)))
    assert isinstance(graph.param(name), torch.nn.Parameter)
    assert graph.param(name).abs().sum() == 0


def test_add_param_and_remove_unused():
    graph = capture(MLP().eval(), (torch.randn(2, 16),))
    first = next(graph.nodes(op="call_function", target=aten.linear.default))
    node = graph.add_param("extra", torch.ones(3), before=first)
    assert graph.dtype(node) == torch.float32 and graph.shape(node) == (3,)
    graph.refresh()  # nobody reads it: refresh drops the node and the attribute
    assert "extra" not in graph.tensors()


def test_lint_is_clean_after_capture_and_catches_a_dangling_attribute():
    graph = capture(MLP().eval(), (torch.randn(2, 16),))
    assert graph.lint() == []
    graph.delete_param("layers.1.bias")
    problems = graph.lint()
    assert any("layers.1.bias" in p for p in problems)


def test_readable_print_shows_shapes_and_weights():
    text = str(capture(SDPABlock().eval(), (torch.randn(2, 6, 16),)))
    assert "input %x: f32[" in text
    assert "aten.linear(%x, @qkv.weight, @qkv.bias)" in text
    assert "aten.scaled_dot_product_attention" in text
    assert text.splitlines()[-1].startswith("return")


def test_networkx_view_has_every_node_and_data_edge():
    graph = capture(MLP().eval(), (torch.randn(2, 16),))
    view = graph.to_networkx()
    assert view.number_of_nodes() == len(graph.fx_graph.nodes)
    linear = next(graph.nodes(target=aten.linear.default))
    assert view.has_edge("x", linear.name)
    assert view.nodes[linear.name]["op"] == "call_function"


def test_copy_is_independent():
    graph = capture(MLP().eval(), (torch.randn(2, 16),))
    clone = graph.copy()
    clone.set_param("layers.0.weight", torch.zeros_like(clone.param("layers.0.weight")))
    assert graph.param("layers.0.weight").abs().sum() > 0


def test_new_weights_never_replace_a_submodule():
    graph = capture(MLP().eval(), (torch.randn(2, 16),))
    first = next(graph.nodes(op="call_function", target=aten.linear.default))
    node = graph.add_param("layers", torch.ones(3), before=first)  # "layers" is a submodule
    assert node.target == "layers_1"
    assert isinstance(graph.module.layers, torch.nn.Module) and "layers.0.weight" in graph.tensors()


class MaskedAttentionScores(torch.nn.Module):
    """Attention scores written with matmul, then attention with a per-key mask [B, 1, 1, N] on heads
    laid out as [B, N, H, D] (attention's output follows the query's layout)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        scores = q @ k.transpose(-1, -2)
        mask = bias[:, None, None, :]
        return scores.sum(-1, keepdim=True) + torch.nn.functional.scaled_dot_product_attention(q, k, k, attn_mask=mask)


def test_linear_attention_and_matmul_values_match_the_fake_kernels_on_symbolic_sizes():
    # used on torch 2.11, where its fake kernels fold a [B, T, C] linear input by its example sizes, fix the
    # batch of an attention with a [B, 1, 1, N] mask and read a run-time size of attention and matmul as a number
    from bevel.ir.meta import attention_value, linear_value, matmul_value

    made = {aten.linear.default: linear_value, aten.scaled_dot_product_attention.default: attention_value,
            aten.matmul.default: matmul_value}
    graphs = [capture(SDPABlock().eval(), (torch.randn(2, 6, 16),)),
              capture(MaskedAttentionScores().eval(), (torch.randn(2, 6, 4, 8), torch.randn(2, 6, 4, 8),
                                                       torch.randn(2, 6)))]
    nodes = [n for graph in graphs for n in graph.nodes(op="call_function", target=tuple(made))]
    assert {n.target for n in nodes} == set(made)
    for node in nodes:
        value = made[node.target](*(a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in node.args))
        expected = node.meta["val"]
        assert (value.shape, value.stride(), value.dtype) == (expected.shape, expected.stride(), expected.dtype)
        assert isinstance(value.shape[0], torch.SymInt)  # the batch stays symbolic


class Upsampled(torch.nn.Module):
    """A conv whose output is resized to twice its own (symbolic) size, as segmentation heads do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        size = (2 * y.shape[2], 2 * y.shape[3])
        return (torch.nn.functional.interpolate(y, size=size, mode="bilinear")
                + torch.nn.functional.interpolate(y, size=size, mode="nearest"))


def test_values_propagate_through_a_resize_to_a_symbolic_size():
    """upsample's C++ composite kernel needs concrete sizes: every refresh failed, so every pass (even
    cleanup) was rolled back on such models; it decomposes in Python now, as under torch.export."""
    model = Upsampled().eval()
    graph = capture(model, (torch.randn(2, 3, 16, 16),))
    graph.refresh()
    resized = list(graph.nodes(op="call_function", target=(aten.upsample_bilinear2d.vec, aten.upsample_nearest2d.vec)))
    assert len(resized) == 2
    for node in resized:
        assert all(isinstance(d, torch.SymInt) for d in node.meta["val"].shape[::2])  # batch and height
    x = torch.randn(3, 3, 24, 32)
    with torch.no_grad():
        assert torch.allclose(graph.module(x), model(x))


class ScaledBranches(torch.nn.Module):
    """HRNet's fusion: a half-resolution branch upsampled by a scale factor and added to a full one."""

    def __init__(self) -> None:
        super().__init__()
        self.low = torch.nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.high = torch.nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.high(x) + torch.nn.functional.interpolate(self.low(x), scale_factor=2.0, mode="nearest")


def test_a_refresh_keeps_the_input_sizes_symbolic(tmp_path):
    """The C++ upsample kernel reads a symbolic size as its example's value before it fails and the
    values are recomputed in Python; that read fixed the batch, height and width of the whole graph at
    the example's for good, so the ONNX export of any model resizing by a scale factor took only the
    example's shape. Recomputing values takes no guard now."""
    import onnxruntime
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    import bevel

    model = ScaledBranches().eval()
    graph = capture(model, (torch.randn(2, 1, 8, 8),))
    graph.refresh()
    x = next(graph.nodes(op="placeholder"))
    assert not any(is_concrete_int(d) for d in x.meta["val"].shape[::2])  # batch and height
    path = bevel.compile(model, "cleanup", example_inputs=(torch.randn(2, 1, 8, 8),)).export_onnx(
        str(tmp_path / "model.onnx"))
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    other = torch.randn(3, 1, 12, 6)
    with torch.no_grad():
        expected = model(other).numpy()
    assert abs(session.run(None, {session.get_inputs()[0].name: other.numpy()})[0] - expected).max() <= 1e-5


def test_a_kernel_retried_under_the_python_dispatcher_logs_no_error(capfd):
    """Bloom's attention (baddbmm onto a bias built from symbolic sizes) fails in its C++ kernel on the
    first propagation and is retried; torch's fake tensors logged that failure with its traceback at
    ERROR level on every refresh, though the refresh succeeded."""
    import transformers

    torch.manual_seed(0)
    model = transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=100, hidden_size=32, n_layer=1,
                                                                   n_head=4, use_cache=False)).eval()
    graph = capture(model, (torch.randint(0, 100, (2, 8)),))
    capfd.readouterr()
    graph.refresh()
    printed = capfd.readouterr()
    assert "failed while attempting to run meta" not in printed.err + printed.out
