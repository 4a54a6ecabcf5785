"""``bevel.eval.perplexity`` and the needle check: the sliding window scores every token once, with
the same figure as HF's own loss when the text fits one window."""

from __future__ import annotations

import math

import pytest
import torch

import bevel
from bevel.errors import BevelError
from bevel.eval import needle_check, perplexity
from bevel.eval.needle import needle_prompts
from bevel.eval.perplexity import unigram_perplexity
from tests.decoders import small_causal_lm


class Uniform(torch.nn.Module):
    """Equal logits over ``vocab`` tokens; counts the tokens it is shown."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.seen = vocab, 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.seen += ids.numel()
        return torch.zeros(*ids.shape, self.vocab)


def test_a_uniform_model_has_the_vocabulary_size_as_perplexity():
    model = Uniform(256)
    # float32 log-softmax: each token's log-probability is exact to ~1e-7 relative
    assert perplexity(model, "a" * 1000, context=64, stride=16) == pytest.approx(256, rel=1e-6)


def test_one_window_equals_the_models_own_loss():
    model = small_causal_lm("llama", max_positions=128)
    ids = torch.randint(3, 300, (100,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = model(ids.unsqueeze(0), labels=ids.unsqueeze(0)).loss.item()
    assert perplexity(model, ids, context=128, stride=128) == pytest.approx(math.exp(loss), rel=1e-5)


def test_sliding_windows_score_every_token_once():
    model = small_causal_lm("llama", max_positions=128)
    ids = torch.randint(3, 300, (250,), generator=torch.Generator().manual_seed(1))
    windowed = perplexity(model, ids, context=64, stride=32)
    # the same, scored token by token by hand: each token with the context its window gives it
    nll, previous_end = 0.0, 0
    with torch.no_grad():
        for begin in range(0, 249, 32):
            end = min(begin + 64, 250)
            logits = model(ids[begin:end].unsqueeze(0)).logits[0].log_softmax(-1)
            for position in range(max(previous_end, begin + 1), end):
                nll -= logits[position - begin - 1, ids[position]].item()
            previous_end = end
            if end == 250:
                break
    assert windowed == pytest.approx(math.exp(nll / 249), rel=1e-5)


def test_a_compiled_decoder_scores_as_the_eager_model():
    model = small_causal_lm("llama", max_positions=128)
    ids = torch.randint(3, 300, (150,), generator=torch.Generator().manual_seed(2))
    cm = bevel.compile(model, "cleanup", example_inputs=(ids[:16].unsqueeze(0),))
    assert perplexity(cm, ids, context=64, stride=32) == pytest.approx(perplexity(model, ids, context=64, stride=32),
                                                                         rel=1e-5)


def test_the_unigram_baseline():
    assert unigram_perplexity("ab" * 100, "abab") == pytest.approx(1 / ((101 / 456)), rel=1e-6)


@pytest.mark.parametrize("kwargs, message", [(dict(context=8, stride=9), "0 < stride <= context"),
                                             (dict(context=8, stride=0), "0 < stride <= context")])
def test_bad_windows_are_refused(kwargs, message):
    with pytest.raises(BevelError, match=message):
        perplexity(Uniform(4), "abcdef", **kwargs)


def test_a_text_of_one_token_is_refused():
    with pytest.raises(BevelError, match="at least two tokens"):
        perplexity(Uniform(4), "a")


def test_needle_prompts_hide_the_answer_early_and_ask_at_the_end():
    pairs = needle_prompts(3, "filler text " * 100, filler_chars=200, seed=1)
    for prompt, answer in pairs:
        assert prompt.startswith("The secret code of") and answer.strip() in prompt[:40]
        assert answer.strip() not in prompt[40:] and len(prompt) > 200


def test_the_needle_check_counts_exact_answers():
    from bevel.models.tinylm.corpus import decode, encode

    class Oracle:
        """Answers by reading the number from the prompt (or, if ``wrong``, one more than it)."""

        def __init__(self, wrong: bool = False) -> None:
            self.wrong = wrong

        def generate(self, ids, max_new_tokens):
            code = int(decode(ids[0]).split(" is ", 1)[1][:4]) + self.wrong
            return torch.cat([ids, encode(f" {code}").unsqueeze(0)], dim=1)

    assert needle_check(Oracle(), "filler " * 200, count=4) == 1.0
    assert needle_check(Oracle(wrong=True), "filler " * 200, count=4) == 0.0
