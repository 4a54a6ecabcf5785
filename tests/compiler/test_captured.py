"""``bevel.capture`` then ``bevel.compile(captured, ...)``: the same result as compiling the model
itself, for every pipeline in a row, with the user's model and the captured graph's code, weights and
metadata unchanged; and the errors a wrong use gives."""

from __future__ import annotations

import pytest
import torch

import bevel
from bevel.errors import BevelError, CaptureError
from bevel.ir.decoder import NotACausalLMError
from bevel.runtime.compiled_module import CompiledModule
from tests.decoders import padded_prompts, small_causal_lm
from tests.models_zoo import MaskedEncoder, padded_tokens, seeded

PIPELINES = ["cleanup", "prune.structured(ratio=0.25) | quantize.int8_weight", "tome(r=2)",
             "prune.magnitude(sparsity=2.0)"]  # the last is refused at parse time


def snapshot(module):
    return {name: value.clone() for name, value in module.state_dict().items()}


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return MaskedEncoder().eval()


@pytest.fixture(scope="module")
def batches():
    g = seeded(1)
    return [padded_tokens(g, batch=3, length=9) for _ in range(3)]


@pytest.mark.parametrize("pipeline", PIPELINES[:3])
def test_compiling_a_captured_model_equals_compiling_the_model(encoder, batches, pipeline):
    """Bit for bit: the same graph goes through the same passes (the captured one is a copy of what
    compile would capture), so outputs, report figures and pass outcomes are equal."""
    x = padded_tokens(seeded(2))
    weights = snapshot(encoder)
    captured = bevel.capture(encoder, x)
    code, graph_weights = captured.graph.module.code, snapshot(captured.graph.module)
    direct = bevel.compile(encoder, pipeline, example_inputs=x, calibration=batches)
    for _ in range(2):  # the second compile sees the captured graph as the first left it
        via = bevel.compile(captured, pipeline, calibration=batches)
        assert [p.status for p in via.report.passes] == [p.status for p in direct.report.passes]
        assert via.report.passes[-1].after == direct.report.passes[-1].after
        # other batch sizes and lengths than the example's: no size was fixed by an earlier compile
        for batch, length in ((1, 5), (4, 11)):
            fresh = padded_tokens(seeded(3), batch=batch, length=length)
            assert torch.equal(via(*fresh), direct(*fresh))
    assert captured.graph.module.code == code and same_tensors(snapshot(captured.graph.module), graph_weights)
    assert same_tensors(snapshot(encoder), weights)


def test_a_captured_causal_lm_compiles_to_the_same_decoder(tmp_path):
    model = small_causal_lm("llama")
    prompts = padded_prompts([5, 3])
    captured = bevel.capture(model, prompts)
    assert captured.decoder and "decoder step graph" in repr(captured)
    code, meta = captured.graph.module.code, dict(captured.graph.module.meta)
    pipeline = "kv.quantize(bits=8) | quantize.int8_weight"
    direct = bevel.compile(model, pipeline, example_inputs=prompts, max_cache_len=32)
    via = bevel.compile(captured, pipeline, max_cache_len=32)
    assert [p.status for p in via.report.passes] == [p.status for p in direct.report.passes] == ["applied"] * 2
    assert via.spec == direct.spec
    ids, mask = padded_prompts([4, 6, 2], seed=5)
    expected = direct.generate(ids, 6, attention_mask=mask)
    assert torch.equal(via.generate(ids, 6, attention_mask=mask), expected)
    # the cache policy the pass set lives in the compile's graph, not in the captured one
    assert captured.graph.module.code == code and captured.graph.module.meta == meta
    loaded = bevel.load(via.save(str(tmp_path / "art")))
    assert torch.equal(loaded.generate(ids, 6, attention_mask=mask), expected)
    # its plain forward: the copy is told not to return a transformers cache object, the model is not
    assert model.config.use_cache
    plain = bevel.capture(model, prompts[0], decoder=False)
    plain_compiled = bevel.compile(plain, "cleanup")
    assert not plain.decoder and isinstance(plain_compiled, CompiledModule)
    # it said the model was no causal LM
    with pytest.raises(NotACausalLMError, match="this LlamaForCausalLM was compiled with decoder=False"):
        plain_compiled.generate(ids, 6)
    assert model.config.use_cache


@pytest.mark.parametrize("given", [{"example_inputs": (torch.zeros(2, 4, 32), torch.ones(2, 4))},
                                   {"dynamic_shapes": "static"}, {"decoder": False}])
def test_compile_refuses_what_the_capture_fixed(encoder, given):
    captured = bevel.capture(encoder, padded_tokens(seeded(2)))
    name = next(iter(given))
    with pytest.raises(BevelError, match=f"{name}.*fixed when the model was captured"):
        bevel.compile(captured, "cleanup", **given)


def test_causal_lm_options_are_refused_for_another_captured_model(encoder):
    captured = bevel.capture(encoder, padded_tokens(seeded(2)))
    with pytest.raises(BevelError, match="max_cache_len and eval_text apply to causal LMs only; MaskedEncoder"):
        bevel.compile(captured, "cleanup", max_cache_len=16)


def test_the_capture_keeps_its_own_example_inputs(encoder):
    x = padded_tokens(seeded(2))
    captured = bevel.capture(encoder, x)
    x[0].zero_()  # the user's tensor, changed after capture
    assert not torch.equal(captured.example_inputs[0], x[0])
    assert torch.equal(bevel.compile(captured, "cleanup").example_inputs[0], padded_tokens(seeded(2))[0])


def test_capture_errors_name_what_is_wrong(encoder):
    weights = snapshot(encoder)
    with pytest.raises(CaptureError, match="MaskedEncoder fails on its example inputs before capture: RuntimeError"):
        bevel.capture(encoder, (torch.zeros(2, 4, 5), torch.ones(2, 4)))
    with pytest.raises(BevelError, match="needs example_inputs"):
        bevel.capture(encoder, None)
    with pytest.raises(CaptureError, match="expects a torch.nn.Module, got str"):
        bevel.capture("model", (torch.zeros(1),))
    with pytest.raises(BevelError, match="decoder=True: MaskedEncoder is not a causal LM"):
        bevel.capture(encoder, padded_tokens(seeded(2)), decoder=True)
    with pytest.raises(BevelError, match="dynamic_shapes=3 must be None"):
        bevel.capture(encoder, padded_tokens(seeded(2)), dynamic_shapes=3)
    from tests.models_zoo import DataDependent

    with pytest.raises(CaptureError, match="if x.sum"):
        bevel.capture(DataDependent(), (torch.randn(2, 4),))
    with pytest.raises(BevelError, match="dynamic_shapes does not apply to a causal LM"):
        bevel.capture(small_causal_lm("llama"), padded_prompts([3]), dynamic_shapes="static")
    assert same_tensors(snapshot(encoder), weights)


def test_a_bad_pipeline_fails_before_the_captured_graph_is_touched(encoder):
    captured = bevel.capture(encoder, padded_tokens(seeded(2)))
    code = captured.graph.module.code
    with pytest.raises(bevel.ParamError, match="sparsity"):
        bevel.compile(captured, PIPELINES[3])
    assert captured.graph.module.code == code
