"""Decoder capture: the step graph of HF Llama, Qwen2 and GPT-2 configs against the eager model.

Tolerance 1e-4 on logits: the step graph runs the model's own ops in fp32 (only the mask is built
differently and the cache is written through index_copy), so differences are float rounding,
observed at ~2e-7; 1e-4 is the issue's bound and leaves room for other CPU kernels' summation order.
"""

from __future__ import annotations

import pytest
import torch

import bevel
from bevel.ir.decoder import NotACausalLMError, attention_sites, cache_names, decoder_spec, prefill_inputs
from tests.decoders import padded_prompts, positions_of, small_causal_lm

FAMILIES = ["llama", "qwen2", "gpt2"]


@pytest.fixture(scope="module", params=FAMILIES)
def compiled(request):
    model = small_causal_lm(request.param)
    ids, mask = padded_prompts([7, 4, 6])
    return model, bevel.compile(model, "cleanup", example_inputs=(ids, mask))


def test_prefill_logits_match_the_eager_model(compiled):
    model, cm = compiled
    ids, mask = padded_prompts([9, 3, 5, 9], seed=1)  # other batch size and length than at capture
    eager = model(ids, attention_mask=mask, position_ids=positions_of(mask)).logits
    logits = cm(ids, mask)
    real = mask.bool()
    assert (logits[real] - eager[real]).abs().max().item() < 1e-4


def test_decode_steps_with_the_cache_match_a_full_recompute(compiled):
    model, cm = compiled
    ids, mask = padded_prompts([6, 2, 4], seed=2)
    steps = 5
    inputs = prefill_inputs(cm.spec, ids, mask, cache_len=ids.shape[1] + steps)
    out = cm.step(*inputs)
    cache = [out[name] for name in cache_names(cm.spec.num_layers, "present")]
    kv_positions, position = inputs[3].clone(), positions_of(mask)[:, -1]
    tokens, masks = ids, mask
    generator = torch.Generator().manual_seed(3)
    for index in range(steps):
        token = torch.randint(3, 300, (ids.shape[0], 1), generator=generator)
        slot = ids.shape[1] + index
        position = position + 1
        kv_positions[:, slot] = position
        out = cm.step(token, position.unsqueeze(1), torch.tensor([slot]), kv_positions, *cache)
        cache = [out[name] for name in cache_names(cm.spec.num_layers, "present")]
        tokens = torch.cat([tokens, token], dim=1)
        masks = torch.cat([masks, torch.ones_like(token)], dim=1)
        full = model(tokens, attention_mask=masks, position_ids=positions_of(masks)).logits[:, -1]
        assert (out["logits"][:, -1] - full).abs().max().item() < 1e-4, f"decode step {index}"


def test_each_layer_has_one_recognizable_attention_fed_by_its_cache(compiled):
    _, cm = compiled
    from bevel.ir.graph import Graph

    sites = attention_sites(Graph(cm.graph_module, cm.example_inputs))
    assert [s.layer for s in sites] == list(range(cm.spec.num_layers))
    for site in sites:
        assert site.key_cache.name == f"past_key_{site.layer}"
        assert site.attention.target == torch.ops.aten.scaled_dot_product_attention.default
        assert site.attention.meta["bevel_attention"] == {"layer": site.layer}
        # its keys and values are this layer's written cache, reshaped (GQA repeat) but not recomputed
        assert _nearest_writes(site.attention.args[1]) == {site.key_write}
        assert _nearest_writes(site.attention.args[2]) == {site.value_write}


def _nearest_writes(node):
    """The cache writes reached going up from ``node`` without passing another attention or write."""
    stops = (torch.ops.aten.index_copy.default, torch.ops.aten.scaled_dot_product_attention.default)
    found, seen, stack = set(), set(), [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.target in stops:
            found.add(current)
        else:
            stack.extend(current.all_input_nodes)
    return {n for n in found if n.target == stops[0]}


def test_the_cache_is_preallocated_and_its_shape_is_the_spec(compiled):
    model, cm = compiled
    spec = cm.spec
    assert spec.num_layers == 2 and spec.max_cache_len == 64
    assert spec.num_kv_heads == (4 if type(model).__name__.startswith("GPT2") else 2)
    ids, mask = padded_prompts([3, 5])
    inputs = prefill_inputs(spec, ids, mask, cache_len=20)
    assert [tuple(t.shape) for t in inputs[4:]] == [(2, spec.num_kv_heads, 20, spec.head_dim)] * 4
    out = cm.step(*inputs)
    assert tuple(out["present_key_1"].shape) == (2, spec.num_kv_heads, 20, spec.head_dim)
    # slots beyond the prompt stay empty
    assert out["present_key_0"][:, :, 5:].abs().max().item() == 0


def test_the_users_model_is_left_untouched():
    model = small_causal_lm("llama", seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, mask = padded_prompts([5, 3])
    bevel.compile(model, "cleanup", example_inputs=(ids, mask))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.config._attn_implementation == "sdpa"


def test_an_encoder_is_not_a_causal_lm():
    from transformers import BertConfig, BertModel

    encoder = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, vocab_size=100)).eval()
    with pytest.raises(NotACausalLMError, match="BertModel is not a causal language model"):
        decoder_spec(encoder)
    ids = torch.randint(0, 100, (2, 5))
    cm = bevel.compile(encoder, "cleanup", example_inputs=(ids,))
    with pytest.raises(NotACausalLMError, match="generate\\(\\) needs a compiled causal language model.*BertModel"):
        cm.generate(ids, max_new_tokens=3)
    with pytest.raises(bevel.BevelError, match="max_cache_len and eval_text apply to causal LMs only"):
        bevel.compile(encoder, "cleanup", example_inputs=(ids,), max_cache_len=32)


@pytest.mark.parametrize("bad, message", [(1, "at least 2"), (True, "at least 2"), ("64", "at least 2")])
def test_a_bad_max_cache_len_is_refused(bad, message):
    model = small_causal_lm("llama")
    ids, mask = padded_prompts([4, 2])
    with pytest.raises(bevel.BevelError, match=f"max_cache_len=.*{message}"):
        bevel.compile(model, "cleanup", example_inputs=(ids, mask), max_cache_len=bad)


def test_bad_prompt_batches_are_named():
    model = small_causal_lm("llama")
    with pytest.raises(bevel.BevelError, match="example_inputs: input_ids must be a non-empty integer tensor"):
        bevel.compile(model, "cleanup", example_inputs=(torch.zeros(2, 0, dtype=torch.long),))
    ids, mask = padded_prompts([4, 2])
    with pytest.raises(bevel.BevelError, match="calibration batch 1: attention_mask"):
        bevel.compile(model, "cleanup", calibration=[(ids, mask), (ids, mask[:, :2])])


def test_an_alibi_decoder_is_refused_by_name_and_compiles_without_a_cache():
    """Bloom builds its ALiBi biases from a [batch, tokens] mask; the step hands it a 4-D one, which
    failed inside Bloom with "too many values to unpack"."""
    import transformers

    from bevel.errors import CaptureError

    torch.manual_seed(0)
    bloom = transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=100, hidden_size=32, n_layer=1,
                                                                   n_head=4)).eval()
    ids = torch.randint(0, 100, (2, 8))
    with pytest.raises(CaptureError, match="BloomForCausalLM adds ALiBi position biases.*decoder=False"):
        bevel.compile(bloom, "cleanup", example_inputs=(ids,))
    cm = bevel.compile(bloom, "cleanup", example_inputs=(ids,), decoder=False)
    fresh = torch.randint(0, 100, (3, 5))
    with torch.no_grad():
        assert torch.allclose(cm(fresh)["logits"], bloom(fresh).logits, atol=1e-5)


def test_a_sliding_window_beside_layers_of_another_kind_is_refused_by_name():
    from types import SimpleNamespace

    from bevel.errors import CaptureError
    from bevel.ir.decoder import sliding_window

    class Chunked(torch.nn.Module):
        config = SimpleNamespace(sliding_window=8, layer_types=["sliding_attention", "chunked_attention"])

    with pytest.raises(CaptureError, match="Chunked has layers of kind chunked_attention beside its sliding window"):
        sliding_window(Chunked())
    Chunked.config.layer_types = ["full_attention", "sliding_attention"]
    assert sliding_window(Chunked()) == (8, ("full_attention", "sliding_attention"))
