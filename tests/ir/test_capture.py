"""capture(): torch.export to a Graph with weights as attributes, shapes on every node, clear errors."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch

from bevel.errors import CaptureError
from bevel.ir import capture
from tests.models_zoo import MLP, ConvNet, DataDependent, SDPABlock


def test_capture_keeps_weights_as_named_attributes_and_outputs_match():
    model = MLP().eval()
    x = torch.randn(3, 16)
    graph = capture(model, (x,))
    assert set(graph.tensors()) == set(dict(model.named_parameters()))
    for name, value in model.named_parameters():
        assert torch.equal(graph.param(name), value)
    assert torch.equal(graph(x), model(x))


def test_every_node_carries_shape_and_dtype_with_symbolic_batch():
    graph = capture(SDPABlock().eval(), (torch.randn(2, 6, 16),))
    for node in graph.nodes():
        if node.op in ("placeholder", "get_attr") or (node.op == "call_function" and node.users):
            assert "val" in node.meta, node
    (inp,) = graph.inputs()
    batch, length, width = graph.shape(inp)
    assert isinstance(batch, torch.SymInt) and isinstance(length, torch.SymInt) and width == 16
    assert graph.dtype(inp) == torch.float32
    # the captured graph serves other batch sizes and lengths
    assert graph(torch.randn(5, 3, 16)).shape == (5, 3, 16)


def test_an_example_dimension_of_size_1_fixed_by_the_capture_is_named():
    """torch.export fixes a batch of 1; the user was told only when a larger batch failed."""
    with pytest.warns(UserWarning, match=r"the example inputs fix input 0 dimension 0 at 1 .*capture with 2 or more"):
        graph = capture(SDPABlock().eval(), (torch.randn(1, 6, 16),))
    assert graph.shape(graph.inputs()[0])[0] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none where nothing is fixed by the example, or fixing was asked for
        capture(SDPABlock().eval(), (torch.randn(2, 6, 16),))
        capture(SDPABlock().eval(), (torch.randn(1, 6, 16),), dynamic_shapes="static")


def test_a_size_1_the_model_fixes_itself_is_not_named_and_a_batch_of_1_is_named_once_per_input():
    """Grayscale images (one channel, which the first conv fixes) were named as if a larger size
    could be kept by capturing with it; a batch of 1 shared by two inputs (ids and their mask) is
    still named in both."""
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    conv(torch.randn(1, 1, 6, 6))
    with pytest.warns(UserWarning) as caught:
        capture(conv.eval(), (torch.randn(1, 1, 6, 6),))
    (message,) = [str(w.message) for w in caught if "example inputs fix" in str(w.message)]
    assert "fix input 0 dimension 0 at 1 (" in message and "dimension 1" not in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        capture(conv.eval(), (torch.randn(2, 1, 6, 6),))
    model = MaskedMean().eval()
    with pytest.warns(UserWarning, match=r"fix input 0 dimension 0, input 1 dimension 0 at 1 "):
        capture(model, (torch.randn(1, 5, 4), torch.ones(1, 5)))


def test_a_slow_capture_says_so_and_with_symbolic_sizes_suggests_fixed_ones(monkeypatch, capsys):
    """torch.export gave no sign of life for 4 minutes on Swin-T with symbolic sizes (2 s with fixed ones); a
    capture taking longer than SLOW_CAPTURE_SECONDS (set to 0 here, so every capture is slow) says so."""
    # the module, not the function bevel.ir exports under the same name
    monkeypatch.setattr(importlib.import_module("bevel.ir.capture"), "SLOW_CAPTURE_SECONDS", 0.0)
    capture(SDPABlock().eval(), (torch.randn(2, 6, 16),))
    err = capsys.readouterr().err
    assert "bevel: capturing SDPABlock with torch.export has taken 0 s so far: with symbolic input sizes" in err
    assert 'dynamic_shapes="static"' in err and "--static-shapes" in err
    capture(SDPABlock().eval(), (torch.randn(2, 6, 16),), dynamic_shapes="static")
    err = capsys.readouterr().err
    assert "has taken 0 s so far\n" in err and "symbolic" not in err
    monkeypatch.undo()
    capture(SDPABlock().eval(), (torch.randn(2, 6, 16),))
    assert "bevel: capturing" not in capsys.readouterr().err


class MaskedMean(torch.nn.Module):
    """The mean of the rows a mask keeps: its two inputs share their batch and length."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (x * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)


def test_static_capture_fixes_shapes():
    graph = capture(MLP().eval(), (torch.randn(3, 16),), dynamic_shapes="static")
    assert graph.shape(graph.inputs()[0]) == (3, 16)


def test_capture_failure_names_the_failing_line_and_suggests_a_fix():
    with pytest.raises(CaptureError) as info:
        capture(DataDependent(), (torch.randn(2, 4),))
    message = str(info.value)
    assert "DataDependent" in message
    assert "if x.sum() > 0:" in message  # the model's own failing line is quoted
    assert "models_zoo.py" in message
    assert "try:" in message


class Box:
    """A Python type torch.export has no pytree rule for (as a transformers cache object)."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value


class ReturnsABox(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> Box:
        return Box(x * 2)


def test_an_output_of_a_type_export_cannot_flatten_gets_a_suggestion():
    with pytest.raises(CaptureError, match="returns a Python type torch.export cannot flatten.*use_cache = False"):
        capture(ReturnsABox(), (torch.randn(2, 3),))


def test_capture_rejects_a_non_module():
    with pytest.raises(CaptureError, match="nn.Module"):
        capture(lambda x: x, (torch.randn(2),))


def test_conv_model_captures_with_dynamic_image_size():
    model = ConvNet().eval()
    graph = capture(model, (torch.randn(2, 3, 12, 12),))
    x = torch.randn(3, 3, 10, 10)
    torch.testing.assert_close(graph(x), model(x), rtol=0, atol=0)


class Pairs(torch.nn.Module):
    """Sums neighbouring pairs: only an even length works, a condition on the length's symbol."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1, 2).sum(-1)


def test_defer_guards_turns_an_unproven_size_condition_into_a_check_in_the_graph():
    # the retry the decoder capture relies on: torch 2.11 cannot prove min(16 L, 32 L) == 16 L in
    # transformers' repeat_kv; here the condition (an even length) is a real one, so the check shows
    dynamic = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("length", min=2, max=64)},)
    x = torch.randn(3, 8)
    with pytest.raises(CaptureError, match="Constraints violated"):
        capture(Pairs(), (x,), dynamic_shapes=dynamic)
    graph = capture(Pairs(), (x,), dynamic_shapes=dynamic, defer_guards=True)
    other = torch.randn(2, 10)
    torch.testing.assert_close(graph(other), Pairs()(other), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="Runtime assertion failed"):
        graph(torch.randn(2, 9))
    plain = capture(MLP().eval(), (torch.randn(3, 16),), defer_guards=True)  # captured the first time: no checks
    assert not [n for n in plain.nodes(op="call_function") if "assert_scalar" in str(n.target)]
