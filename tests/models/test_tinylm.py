"""tinylm, the trained byte-level decoder that ships with bevel: it loads offline, predicts held-out
English far better than byte frequencies do, and compiled greedy generation equals HF's."""

from __future__ import annotations

import pytest
import torch

import bevel
from bevel.eval import needle_check, perplexity
from bevel.eval.perplexity import unigram_perplexity
from bevel.models import tinylm
from bevel.models.tinylm import corpus

# a 16 KB slice of the held-out text keeps the test at a few seconds; the whole split's figure is
# in the model's README and metrics.json
HELD_OUT_BYTES = 16384


@pytest.fixture(scope="module")
def model(tinylm_model):
    return tinylm_model


@pytest.fixture(scope="module")
def compiled(tinylm_captured):
    return bevel.compile(tinylm_captured, "cleanup", max_cache_len=1024)


def test_tinylm_loads_offline_with_its_shipped_size(model):
    params = sum(p.numel() for p in model.parameters())
    assert model.config.num_hidden_layers == 12 and model.config.num_key_value_heads < model.config.num_attention_heads
    assert 4e6 < params < 6e6
    assert tinylm.WEIGHTS.stat().st_size < 25 * 2**20


def test_held_out_perplexity_is_far_below_a_unigram_byte_model(model):
    text = corpus.held_out_text()
    ours = perplexity(model, text, context=512, stride=256, max_tokens=HELD_OUT_BYTES)
    unigram = unigram_perplexity(corpus.training_stream()[corpus.training_stream() < 256],
                                 corpus.encode(text)[:HELD_OUT_BYTES])
    print(f"\ntinylm held-out perplexity {ours:.3f} per byte; unigram byte model {unigram:.3f} "
          f"(first {HELD_OUT_BYTES} held-out bytes)")
    assert ours < unigram / 3


def test_compiled_greedy_generation_equals_hf_generate(model, compiled):
    ids, mask = tinylm.prompts(["Return the value of", "The", "Raise an exception when the", "A list"])
    ours = compiled.generate(ids, max_new_tokens=40, attention_mask=mask, eos_token_id=None)
    hf = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, eos_token_id=None,
                        pad_token_id=tinylm.EOS)
    assert torch.equal(ours, hf)
    print("\n" + "\n".join(repr(tinylm.decode(row[row != tinylm.EOS])) for row in ours))


def test_prefill_and_decode_match_the_eager_model(model, compiled):
    from bevel.ir.decoder import cache_names, prefill_inputs

    ids, mask = tinylm.prompts(["Import the module", "Class"])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    eager = model(ids, attention_mask=mask, position_ids=positions).logits
    assert (compiled(ids, mask) - eager)[mask.bool()].abs().max().item() < 1e-4
    inputs = prefill_inputs(compiled.spec, ids, mask, cache_len=ids.shape[1] + 1)
    cache = [compiled.step(*inputs)[n] for n in cache_names(12, "present")]
    token = torch.tensor([[32], [101]])
    kv_positions = inputs[3].clone()
    kv_positions[:, -1] = positions[:, -1] + 1
    out = compiled.step(token, positions[:, -1:] + 1, torch.tensor([ids.shape[1]]), kv_positions, *cache)
    full_mask = torch.cat([mask, torch.ones_like(token)], 1)
    full = model(torch.cat([ids, token], 1), attention_mask=full_mask,
                 position_ids=(full_mask.cumsum(1) - 1).clamp(min=0)).logits[:, -1]
    assert (out["logits"][:, -1] - full).abs().max().item() < 1e-4


def test_the_report_gives_held_out_perplexity_before_and_after_each_pass(model, tinylm_captured):
    text = corpus.held_out_text()[:4096]
    cm = bevel.compile(tinylm_captured, "cleanup | quantize.int8_weight", eval_text=text, max_cache_len=1024)
    before = cm.report.quality["perplexity"]
    after = cm.report["quantize.int8_weight"].quality["perplexity"]
    print(f"\nheld-out perplexity: original {before:.4f}, after int8 weights {after:.4f}")
    assert before == pytest.approx(perplexity(model, text, context=512, stride=256), rel=1e-6)
    assert abs(after / before - 1) < 0.02  # per-channel int8 weights barely move a byte-level LM
    assert "held-out quality: before the passes perplexity" in str(cm.report)


def test_the_needle_check_gives_the_same_score_compiled_and_eager(model, compiled):
    """tinylm does not copy: it scores 0 of 8 even with no filler (it completes "The secret code of
    the archive is" with " a string th..."), so the check's figure is a baseline for passes, not a
    skill; its correctness is tested on an oracle in tests/eval."""
    filler = corpus.held_out_text()
    scores = [needle_check(m, filler, filler_chars=100, count=8) for m in (model, compiled)]
    print(f"\nneedle check (100 bytes of filler): eager {scores[0]:.2f}, compiled {scores[1]:.2f}")
    assert scores[0] == scores[1]


def test_the_training_script_is_deterministic(tmp_path):
    """Two short runs with the same settings write identical weights: how the shipped ones reproduce."""
    from safetensors.torch import load_file

    from bevel.models.tinylm import train

    settings = ["--steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-bytes", "256"]
    train.main(settings + ["--out", str(tmp_path / "a")])
    train.main(settings + ["--out", str(tmp_path / "b")])
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], tinylm.build_untrained().model.embed_tokens.weight)
