"""bevel.compile's eval_text for causal LMs: a short text is scored (the window shrinks to fit it),
and a text of the wrong type or with ids outside the vocabulary is refused by name, before capture,
with the user's model left untouched."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import bevel
from bevel.compiler import compile_decoder
from bevel.errors import BevelError
from bevel.eval.perplexity import perplexity
from tests.decoders import VOCAB, padded_prompts, small_causal_lm


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_short_text_gives_a_finite_perplexity():
    model = small_causal_lm("llama")
    before = snapshot(model)
    text = "hello world, short text"  # 23 byte tokens, fewer than the default stride of 256
    ids, _ = padded_prompts([5])
    cm = bevel.compile(model, "cleanup", example_inputs=(ids,), eval_text=text)
    original = cm.report.quality["perplexity"]
    assert math.isfinite(original)
    assert original == pytest.approx(perplexity(model, text, context=len(text), stride=len(text)), rel=1e-6)
    assert math.isfinite(cm.report["cleanup"].quality["perplexity"])
    assert_untouched(model, before)


@pytest.mark.parametrize("tokens, context, stride", [(23, 23, 23), (300, 300, 256), (600, 512, 256)])
def test_the_window_fits_the_text_and_long_texts_keep_the_defaults(monkeypatch, tokens, context, stride):
    calls = []
    module = importlib.import_module("bevel.eval.perplexity")  # bevel.eval.perplexity is also the function
    monkeypatch.setattr(module, "perplexity", lambda model, ids, **kw: calls.append(kw) or 1.0)
    spec = compile_decoder.decoder_spec(small_causal_lm("llama"))
    probe = compile_decoder._perplexity_probe(torch.arange(tokens) % VOCAB, spec)
    assert probe(None) == 1.0
    assert calls == [{"context": context, "stride": stride}]


@pytest.mark.parametrize("eval_text, fragment", [
    (5, "eval_text must be a str .* or an integer tensor of token ids, got int"),
    (torch.rand(300), "eval_text must be a str .* got Tensor torch.float32"),
    (torch.full((300,), 5000), f"eval_text holds token id 5000, outside the model's vocabulary of {VOCAB} tokens"),
    (torch.tensor([3, -1, 4]), "eval_text holds token id -1, outside the model's vocabulary"),
])
def test_a_bad_eval_text_is_refused_by_name_before_capture(monkeypatch, eval_text, fragment):
    def no_capture(*args, **kwargs):
        raise AssertionError("eval_text must be checked before capture")

    monkeypatch.setattr(compile_decoder, "capture_decoder", no_capture)
    model = small_causal_lm("llama")
    before = snapshot(model)
    ids, _ = padded_prompts([5])
    with pytest.raises(BevelError, match=fragment):
        bevel.compile(model, "cleanup", example_inputs=(ids,), eval_text=eval_text)
    assert_untouched(model, before)
