"""Attention passes on models that slide a window of their own (Mistral in every layer, Qwen2 in all
but its first): a pass narrows what a layer sees and never widens it, so a pass window wider than the
model's leaves those layers exactly as they were (prefill logits within 1e-5, greedy tokens equal to
HF's own generate, whose cache and masks are HF's)."""

from __future__ import annotations

import torch

import bevel
from bevel.ir.decoder import prefill_inputs
from tests.decoders import assert_prefill_and_generation_match_hf, padded_prompts, positions_of, small_causal_lm

OWN_WINDOW = 6


def test_a_wider_window_leaves_a_sliding_model_as_it_was():
    """Before, the pass's window replaced the model's: every query saw 16 tokens instead of 6."""
    model = small_causal_lm("mistral", seed=3, sliding_window=OWN_WINDOW)
    ids, mask = padded_prompts([20, 9, 14], seed=4)
    cm = assert_prefill_and_generation_match_hf(model, ids, mask, "attention.window(window=16, sinks=4, block=16)")
    entry = cm.report.passes[-1]
    assert entry.status == "applied" and entry.stats["own_window_layers"] == [0, 1]
    assert any("layers 0, 1 keep the model's own sliding window (6 tokens" in note for note in entry.notes)


def test_only_the_layers_that_slide_keep_their_window():
    """Qwen2's first layer attends to everything and takes the pass's window; its second keeps its own
    (prompts of at most 16 tokens, where a window of 16 changes nothing on the first layer)."""
    model = small_causal_lm("qwen2", seed=3, sliding_window=OWN_WINDOW)
    ids, mask = padded_prompts([16, 11], seed=5)
    cm = bevel.compile(model, "attention.window(window=16, sinks=0, block=16)", example_inputs=(ids, mask))
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, position_ids=positions_of(mask)).logits
    assert torch.allclose(cm(ids, mask)[mask.bool()], expected[mask.bool()], atol=1e-5)
    assert cm.report.passes[-1].stats["own_window_layers"] == [1]


def test_per_head_patterns_keep_the_models_window_on_every_head():
    """Retrieval heads used to get full attention and streaming heads the pass's wider window."""
    model = small_causal_lm("mistral", seed=3, sliding_window=OWN_WINDOW)
    ids, mask = padded_prompts([28, 25], seed=6)
    cm = assert_prefill_and_generation_match_hf(
        model, ids, mask, "attention.heads(window=16, sinks=4, retrieval_share=0.5, block=16)",
        calibration=[(ids, mask)])
    assert 0 < cm.report.passes[-1].stats["streaming_heads"] < cm.report.passes[-1].stats["heads"]


def test_the_cache_passes_keep_the_models_window_in_the_decode_loop(tmp_path):
    """kv.evict and kv.quantize keep the model's attention; their decode loop reads the cache through
    ``bevel::cache_attention``, which used to be given no window for it (the copied and the loaded
    graphs had lost the model's windows): every layer saw the whole prompt, the prefill logits were 0.2
    off on this model."""
    model = small_causal_lm("mistral", seed=3, sliding_window=OWN_WINDOW)
    ids, mask = padded_prompts([20, 9, 14], seed=4)
    # a budget above prompt plus new tokens evicts nothing: the model's own logits and greedy tokens
    assert_prefill_and_generation_match_hf(model, ids, mask, "kv.evict(budget=40)")
    # rounded keys and values: the loop's prefill equals the step graph's, whose masks hold the window,
    # after save and load too. One layer, so that both round the same keys and values: its attention
    # runs in another kernel, and in a later layer a last-bit difference may round a key to the next code.
    # 1e-5: the same values summed in another order
    model = small_causal_lm("mistral", seed=3, sliding_window=OWN_WINDOW, layers=1)
    cm = bevel.compile(model, "kv.quantize(bits=8)", example_inputs=(ids, mask))
    assert cm.spec.native_windows == (OWN_WINDOW,)
    expected = cm.step(*prefill_inputs(cm.spec, ids, mask))["logits"]
    loaded = bevel.load(cm.save(str(tmp_path / "artifact")))
    assert loaded.spec.native_windows == (OWN_WINDOW,)
    real = mask.bool()
    for compiled in (cm, loaded):
        assert torch.allclose(compiled(ids, mask)[real], expected[real], atol=1e-5)
