"""Attention passes on models that slide a window of their own (Mistral in every layer, Qwen2 in all
but its first): a pass narrows what a layer sees and never widens it, so a pass window wider than the
model's leaves those layers exactly as they were (prefill logits within 1e-5, greedy tokens equal to
HF's own generate, whose cache and masks are HF's)."""

from __future__ import annotations

import torch

import bevel
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
