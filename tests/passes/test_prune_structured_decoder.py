"""prune.structured on a causal LM compiled with its KV cache (the decoder step graph, for generate()):
a removed KV head leaves the projections and the cache the runtime allocates, layer by layer.

The reference is the same pipeline on the model's plain forward (``decoder=False``), pruned the same way:
ranked by weight magnitude without compensation, both choose the same heads from the same weights, so
their logits agree to float rounding (1e-5; measured 0) and greedy generation over the smaller cache
equals greedy decoding by hand with the plain pruned forward, token for token.
"""

from __future__ import annotations

import dataclasses

import onnxruntime as ort
import pytest
import torch

import bevel
from bevel.ir.decoder import prefill_inputs
from tests.decoders import small_causal_lm

# GPT-2's linears are HF Conv1D (addmm), which cleanup writes as Linear layers first
PRUNE_HEADS = 'cleanup | prune.structured(target="heads", ratio=0.5, importance="l1", compensate=false)'


def prompts(seed: int, batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(3, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def compiled_both_ways():
    """``get(kind)``: the model, its decoder and its plain forward, pruned of half their heads; compiled
    once per kind, for the tests that only read them."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            model = small_causal_lm(kind)
            calibration = [(prompts(i, batch=4, length=12),) for i in (1, 2)]
            decoder = bevel.compile(model, PRUNE_HEADS, example_inputs=(prompts(0),), calibration=calibration)
            plain = bevel.compile(model, PRUNE_HEADS, example_inputs=(prompts(0),), calibration=calibration,
                                  decoder=False)
            cache[kind] = model, decoder, plain
        return cache[kind]

    return get


def logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("kind, kv_heads", [("llama", (1, 1)), ("gpt2", (2, 2))])
def test_heads_go_from_the_cache_and_the_decoder_equals_the_pruned_plain_forward(compiled_both_ways, kind,
                                                                                    kv_heads):
    """Llama (4 query heads on 2 KV heads: a KV head goes with its two query heads) and GPT-2 (4 heads)."""
    model, decoder, plain = compiled_both_ways(kind)
    assert decoder.report.passes[-1].status == "applied", decoder.report.passes[-1].notes
    assert decoder.spec.kv_heads == kv_heads
    stream = decoder.stream(prompts(3), max_new_tokens=1)
    assert [tuple(t.shape[:2]) for t in stream.cache.kv] == [(2, h) for h in kv_heads for _ in "kv"]
    fresh = prompts(4, batch=3, length=9)
    with torch.no_grad():
        expected = logits(plain(fresh))
        assert (decoder(fresh) - expected).abs().max() <= 1e-5
        assert (expected - model(fresh).logits).abs().max() > 1e-3  # the pruning changed something
        tokens = fresh[:, :5]
        for _ in range(6):  # greedy by hand on the plain pruned forward
            tokens = torch.cat([tokens, logits(plain(tokens))[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(decoder.generate(fresh[:, :5], max_new_tokens=6), tokens)


def test_a_pruned_decoder_saves_loads_and_exports_with_its_smaller_cache(compiled_both_ways, tmp_path):
    _, decoder, _ = compiled_both_ways("llama")
    fresh = prompts(5, batch=3, length=8)
    loaded = bevel.load(decoder.save(str(tmp_path / "artifact")))
    assert loaded.spec.kv_heads == (1, 1)
    assert torch.equal(loaded.generate(fresh, max_new_tokens=5), decoder.generate(fresh, max_new_tokens=5))

    session = ort.InferenceSession(decoder.export_onnx(str(tmp_path / "model.onnx")),
                                   providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert shapes["past_key_0"][1] == 1 and shapes["past_value_1"][1] == 1
    inputs = prefill_inputs(decoder.spec, fresh)
    (onnx_logits, *_) = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)})
    # float32 in onnxruntime with another summation order; a wrong head would be off by orders more
    assert abs(onnx_logits - decoder(fresh).detach().numpy()).max() <= 1e-4


@pytest.mark.parametrize("cache_pass", ["kv.quantize(bits=4, group_size=16) | kv.evict(budget=8)",
                                        "attention.window(window=8, sinks=2, block=16)"])
def test_every_form_of_the_cache_is_allocated_with_the_heads_each_layer_kept(cache_pass, tmp_path):
    """Quantized codes and their parameters, eviction's positions and scores, a ring buffer: 7 prompt
    tokens and 12 new ones outgrow the budget and the window, so the loop keeps the cache its way."""
    passes = f'prune.structured(target="heads", ratio=0.5) | {cache_pass}'
    decoder = bevel.compile(small_causal_lm("llama"), passes, example_inputs=(prompts(0),), max_cache_len=64,
                            calibration=[(prompts(1, batch=4, length=12),)])
    assert {p.status for p in decoder.report.passes} == {"applied"}
    stream = decoder.stream(prompts(8), max_new_tokens=12)
    assert stream.mode == ("ring" if cache_pass.startswith("attention.window") else "evict")
    stream.prefill()
    assert {t.shape[1] for t in stream.cache.all()} == {1}  # one KV head in each layer
    out = decoder.generate(prompts(8), max_new_tokens=12, eos_token_id=None)
    loaded = bevel.load(decoder.save(str(tmp_path / "artifact")))
    assert loaded.spec == decoder.spec
    assert torch.equal(loaded.generate(prompts(8), max_new_tokens=12, eos_token_id=None), out)


def test_the_step_graph_names_a_cache_given_at_the_heads_it_had(compiled_both_ways):
    _, decoder, _ = compiled_both_ways("llama")
    before = prefill_inputs(dataclasses.replace(decoder.spec, kv_heads=None), prompts(6))
    with pytest.raises(AssertionError, match="input 'past_key_0' must have size 1 in dimension 1"):
        decoder.step(*before)


def test_a_rolled_back_pruning_leaves_the_cache_to_the_passes_after_it():
    """A fidelity budget the pruning exceeds rolls it back: the pass after it is checked on calibration
    batches with every KV head again (on the cut ones the restored graph fails and is rolled back too),
    and the runtime's cache keeps every head. The budget, 1e-4, is far below what half the heads cost
    and far above float rounding (cleanup is exact)."""
    passes = 'prune.structured(target="heads", ratio=0.5) | cleanup'
    decoder = bevel.compile(small_causal_lm("llama"), passes, example_inputs=(prompts(0),), max_fidelity_drop=1e-4,
                            calibration=[(prompts(1, batch=4, length=12),)])
    assert [p.status for p in decoder.report.passes] == ["rolled back", "applied"], \
        [p.reason for p in decoder.report.passes]
    assert decoder.spec.kv_heads is None
    assert decoder.generate(prompts(7), max_new_tokens=4).shape == (2, 11)


class NamedLikeACache(torch.nn.Module):
    """No decoder: its caller gives ``past_key_0``, whatever its name says."""

    def __init__(self) -> None:
        super().__init__()
        self.key, self.out = torch.nn.Linear(8, 6), torch.nn.Linear(6, 4)

    def forward(self, x: torch.Tensor, slots: torch.Tensor, past_key_0: torch.Tensor) -> torch.Tensor:
        return self.out(past_key_0.index_copy(1, slots, self.key(x)))


def test_another_models_input_keeps_its_size_whatever_its_name():
    example = (torch.randn(2, 3, 8), torch.tensor([0, 2, 4]), torch.zeros(2, 6, 6))
    compiled = bevel.compile(NamedLikeACache().eval(), 'prune.structured(target="all", ratio=0.5)',
                             example_inputs=example)
    assert compiled.report.passes[0].status == "no change"
    assert any("into the input 'past_key_0', which the caller allocates" in n for n in compiled.report.passes[0].notes)
