"""bevel.compile: inputs checked before work, the user's model never touched, the result callable like it."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from torch import nn

import bevel
from bevel.errors import BevelError, CaptureError, ParamError, PipelineError
from tests.models_zoo import DataDependent, MLP


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before, training):
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training == training


@pytest.mark.parametrize("passes, error, fragment", [
    ("cleanup | | prune.magnitude", PipelineError, "^"),
    ("prune.magnitud(sparsity=0.3)", PipelineError, "did you mean 'prune.magnitude'"),
    ("prune.magnitude(sparsty=0.3)", ParamError, "did you mean 'sparsity'"),
    ("prune.magnitude(sparsity=1.5)", ParamError, "sparsity must be in [0.0, 1.0)"),
])
def test_bad_pipelines_fail_before_work_and_leave_the_model_untouched(passes, error, fragment):
    model = MLP().train()
    before = snapshot(model)
    with pytest.raises(error) as info:
        bevel.compile(model, passes, example_inputs=(torch.randn(2, 16),))
    assert fragment in str(info.value)
    assert_untouched(model, before, training=True)


def test_uncapturable_model_gives_capture_error_and_is_untouched():
    model = DataDependent().train()
    before = snapshot(model)
    with pytest.raises(CaptureError, match="if x.sum"):
        bevel.compile(model, "cleanup", example_inputs=(torch.randn(2, 4),))
    assert_untouched(model, before, training=True)


def test_other_bad_arguments():
    model = MLP()
    with pytest.raises(BevelError, match="example_inputs"):
        bevel.compile(model, "cleanup")
    with pytest.raises(ParamError, match="max_fidelity_drop"):
        bevel.compile(model, "cleanup", example_inputs=(torch.randn(2, 16),), max_fidelity_drop=-1)
    with pytest.raises(BevelError, match="device"):
        bevel.compile(model, "cleanup", example_inputs=(torch.randn(2, 16),), device="tpu9")
    with pytest.raises(CaptureError, match="MLP fails on its example inputs before capture"):
        bevel.compile(model, "cleanup", example_inputs=(torch.randn(2, 7),))
    with pytest.raises(CaptureError,
                       match=r"MLP fails on calibration batch 1 \(input shapes \[\(4, 5\)\]\) before capture"):
        bevel.compile(model, "cleanup", example_inputs=(torch.randn(2, 16),),
                      calibration=[(torch.randn(3, 16),), (torch.randn(4, 5),)])
    with pytest.raises(CaptureError, match="nn.Module"):
        bevel.compile(lambda x: x, "cleanup", example_inputs=(torch.randn(2, 16),))
    with pytest.raises(BevelError, match="decoder=True: MLP is not a causal LM"):
        bevel.compile(model, "cleanup", example_inputs=(torch.randn(2, 16),), decoder=True)


@pytest.mark.parametrize("key, value, fragment", [
    ("seed", "x", "seed='x' must be an integer that fits in 64 bits"),
    ("seed", 2**70, "must be an integer that fits in 64 bits"),
    ("seed", 1.5, "seed=1.5 must be an integer"),
    ("dynamic_shapes", "foo", "dynamic_shapes='foo' must be None"),
    ("dynamic_shapes", 3, "dynamic_shapes=3 must be None"),
    ("decoder", "yes", "decoder='yes' must be None"),
])
def test_bad_seed_dynamic_shapes_and_decoder_are_refused_by_name_before_capture(key, value, fragment):
    model = MLP()
    before = snapshot(model)
    with pytest.raises(ParamError, match=re.escape(fragment)) as caught:
        bevel.compile(model, "cleanup", example_inputs=(torch.randn(2, 16),), **{key: value})
    assert caught.value.key == key
    assert_untouched(model, before, training=True)


def test_compiled_module_is_an_nn_module_called_like_the_model():
    torch.manual_seed(0)
    model = MLP().train()  # left in training mode on purpose: compile works on an eval copy
    before = snapshot(model)
    x = torch.randn(3, 16)
    cm = bevel.compile(model, ["cleanup", bevel.passes.get_pass("prune.magnitude")(sparsity=0.2)],
                       example_inputs=x, calibration=[(torch.randn(5, 16),), torch.randn(6, 16)])
    assert isinstance(cm, torch.nn.Module)
    assert cm.pipeline == "cleanup | prune.magnitude(sparsity=0.2)"
    assert cm(torch.randn(9, 16)).shape == (9, 8)
    assert cm.report.calibration_batches == 2
    assert_untouched(model, before, training=True)
    assert "prune.magnitude(sparsity=0.2)" in str(cm.report)


def test_bad_types_for_budget_and_calibration_are_clear():
    model = MLP()
    x = (torch.randn(2, 16),)
    with pytest.raises(ParamError, match="must be a number"):
        bevel.compile(model, "cleanup", example_inputs=x, max_fidelity_drop="0.1")
    with pytest.raises(BevelError, match="calibration must be an iterable"):
        bevel.compile(model, "cleanup", example_inputs=x, calibration=5)


def test_an_empty_example_is_refused_where_sizes_should_vary():
    """It compiled a graph that took only empty inputs, and reported a cosine of 1.0 over nothing."""
    model = MLP().eval()
    before = snapshot(model)
    message = r"example input tensor 0 has shape \[0, 16\]: a dimension of size 0 would be fixed into the graph"
    with pytest.raises(BevelError, match=message):
        bevel.compile(model, "cleanup", example_inputs=(torch.randn(0, 16),))
    with pytest.raises(BevelError, match=message):
        bevel.capture(model, (torch.randn(0, 16),))
    assert_untouched(model, before, training=False)


def test_an_endless_calibration_iterator_is_refused_instead_of_read_forever():
    model = MLP().eval()
    before = snapshot(model)
    endless = itertools.repeat((torch.randn(2, 16),))  # a cycling data loader
    with pytest.raises(BevelError, match=r"calibration gave more than 4096 batches \(an endless iterator\?\)"):
        bevel.compile(model, "cleanup", calibration=endless)
    assert_untouched(model, before, training=False)


def test_calibration_that_does_not_fit_static_shapes_is_named_before_any_pass():
    model = MLP().eval()
    with pytest.raises(CaptureError, match=r"calibration batch 1 \(input shapes \[\(5, 16\)\]\)"):
        bevel.compile(model, "cleanup", example_inputs=(torch.randn(2, 16),), dynamic_shapes="static",
                      calibration=[(torch.randn(2, 16),), (torch.randn(5, 16),)])


def test_capture_fidelity_is_exact_and_reported():
    cm = bevel.compile(MLP().eval(), "cleanup", example_inputs=(torch.randn(3, 16),))
    assert cm.report.capture_fidelity.cosine == pytest.approx(1.0)
    assert cm.report.capture_fidelity.max_abs_error == 0.0
    rows = [line for line in str(cm.report).splitlines() if "(captured)" in line]
    assert len(rows) == 1 and "1.00000" in rows[0]


@pytest.mark.parametrize("args, fragment", [
    ((torch.randn(3, 7),), "input 0 (x) should have shape [s0, 16] (named sizes may vary), got [3, 7]"),
    ((torch.randn(3, 2, 16),), "input 0 (x) should have shape [s0, 16]"),
    ((torch.randn(3, 16, dtype=torch.float64),), "input 0 (x) should be float32, got float64"),
    ((torch.randn(3, 16), torch.randn(1)), "it takes 1 positional input (x), got 2"),
    ((3,), "input 0 (x) should be a float32 tensor of shape [s0, 16], got an int"),
])
def test_a_compiled_module_called_with_inputs_it_cannot_take_says_which(args, fragment):
    cm = bevel.compile(MLP().eval(), "cleanup", example_inputs=(torch.randn(2, 16),))
    with pytest.raises(BevelError) as caught:
        cm(*args)
    message = str(caught.value)
    assert message.startswith("the compiled MLP cannot take these inputs: ")
    assert re.sub(r"\bs\d+\b", "s0", fragment) in re.sub(r"\bs\d+\b", "s0", message)  # symbol names vary
    assert cm(torch.randn(5, 16)).shape == (5, 8)  # a good call after a bad one


class Scaled(torch.nn.Module):
    """A model taking a Python number beside its tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        return self.linear(x) * scale


def test_a_python_number_input_other_than_the_captured_one_is_named(tmp_path):
    """torch.export fixes a Python number into the graph; another value failed on a bare guard assertion."""
    model = Scaled().eval()
    cm = bevel.compile(model, "cleanup", example_inputs=(torch.randn(2, 16), 2.0))
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = model(x, 2.0)
    for compiled in (cm, bevel.load(cm.save(str(tmp_path / "artifact")))):
        with pytest.raises(BevelError, match=r"input 1 \(scale\) is a Python number, which the capture fixed into "
                                             r"the graph as 2.0; got 3.0: compile the model with that value"):
            compiled(x, 3.0)
        with pytest.raises(BevelError, match=r"fixed into the graph as 2.0; got a Tensor"):
            compiled(x, torch.tensor([2.0, 3.0]))
        # keyword arguments were a bare TypeError
        with pytest.raises(BevelError, match=r"takes its inputs by position, as it was captured \(x, scale\); got "
                                             r"keyword arguments scale"):
            compiled(x, scale=2.0)
        assert torch.allclose(compiled(x, 2.0), expected, atol=1e-6)


class DictInput(torch.nn.Module):
    """A model taking its tensors in a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(16, 8)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.linear(batch["x"]) + batch["bias"]


class OptionalInput(torch.nn.Module):
    """A model with an input the caller may leave out (None)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        out = self.linear(x)
        return out if extra is None else out + extra


def test_inputs_in_a_dict_or_a_tuple_keep_their_sizes_dynamic():
    model = DictInput().eval()
    example = {"x": torch.randn(3, 16), "bias": torch.randn(3, 8)}
    compiled = bevel.compile(model, "cleanup | quantize.int8_weight", example_inputs=(example,))
    assert compiled.report["quantize.int8_weight"].status == "applied"
    other = {"x": torch.randn(5, 16), "bias": torch.randn(5, 8)}
    with torch.no_grad():
        # int8 weights per output channel: at most half a step (max |w| / 254, about 1e-3 here) per weight,
        # times |x| summed over 16 inputs: about 0.015 at worst
        assert (compiled(other) - model(other)).abs().max() < 0.05


def test_an_input_given_as_none_does_not_stop_the_passes():
    model = OptionalInput().eval()
    x = torch.randn(3, 16)
    compiled = bevel.compile(model, "cleanup | quantize.int8_weight", example_inputs=(x, None))
    assert compiled.report["quantize.int8_weight"].status == "applied"
    other = torch.randn(4, 16)
    with torch.no_grad():
        assert (compiled(other, None) - model(other, None)).abs().max() < 0.05  # as for the dict input above


class DoublesItsInput(nn.Module):
    """Changes its input in place, as some preprocessing code does."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return self.linear(x)


def test_a_model_that_changes_its_input_in_place_compiles_on_copies():
    """bevel.compile runs the model and its graph several times (reference, capture check, each pass's
    check): on the user's tensor, x.mul_(2) piled up (x became 8x) and the runs compared different
    inputs. They run on copies; calling the compiled model changes its input once, as eager does."""
    torch.manual_seed(0)
    model = DoublesItsInput().eval()
    x = torch.ones(2, 8)
    compiled = bevel.compile(model, "cleanup", example_inputs=(x,), calibration=[(x,), (x + 1,)])
    assert torch.equal(x, torch.ones(2, 8))
    assert compiled.report.capture_fidelity.max_abs_error == 0.0
    assert compiled.report.fidelity.max_abs_error == 0.0
    mine, theirs = torch.ones(2, 8), torch.ones(2, 8)
    torch.testing.assert_close(compiled(mine), model(theirs), atol=1e-6, rtol=0)
    assert torch.equal(mine, theirs)  # both doubled once


def test_torch_compile_of_a_model_that_changes_its_input_runs_it_once_per_call():
    torch.manual_seed(0)
    model = DoublesItsInput().eval()
    x = torch.ones(2, 8)
    y = torch.compile(model, backend="bevel")(x)
    torch.testing.assert_close(y, model.linear(torch.full((2, 8), 2.0)), atol=1e-6, rtol=0)
    assert torch.equal(x, torch.full((2, 8), 2.0))
