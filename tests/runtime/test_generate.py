"""``CompiledDecoder.generate``: greedy decoding equals HF's own ``generate`` token for token on
batches of prompts of different lengths; EOS stops rows; sampling settings; save/load; the decode
step in ONNX Runtime; and every bad input a user can give."""

from __future__ import annotations

import pytest
import torch

import bevel
from bevel.ir.decoder import cache_names, prefill_inputs
from bevel.runtime.compiled_decoder import GenerateError
from tests.decoders import PAD, assert_prefill_and_generation_match_hf, hf_greedy, padded_prompts, small_causal_lm


@pytest.fixture(scope="module")
def llama():
    model = small_causal_lm("llama", layers=3)
    ids, mask = padded_prompts([8, 3, 6])
    return model, bevel.compile(model, "cleanup", example_inputs=(ids, mask), max_cache_len=48)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_greedy_generation_equals_hf_generate(kind):
    model = small_causal_lm(kind, seed=5)
    ids, mask = padded_prompts([5, 9, 1, 7], seed=6)
    cm = bevel.compile(model, "cleanup", example_inputs=(ids, mask))
    out = cm.generate(ids, max_new_tokens=16, attention_mask=mask, eos_token_id=None)
    assert out.shape == (4, 9 + 16)
    assert torch.equal(out, hf_greedy(model, ids, mask, 16))


@pytest.mark.parametrize("kind, window", [("llama", None), ("gpt2", None), ("qwen2", 4)])
def test_eager_attention_generates_as_hf_does(kind, window):
    """HF's eager attention adds its 4-D mask to the scores: the step's boolean mask, added as 0 and 1,
    masked nothing (every token saw the ones after it), so it is handed an additive mask."""
    model = small_causal_lm(kind, seed=5, sliding_window=window)
    model.config._attn_implementation = "eager"
    ids, mask = padded_prompts([5, 9, 1, 7], seed=6)
    assert_prefill_and_generation_match_hf(model, ids, mask)


def test_an_attention_kernel_that_takes_no_ready_mask_is_refused_by_name():
    model = small_causal_lm("llama")
    model.config._attn_implementation = "flex_attention"
    ids, mask = padded_prompts([5, 3])
    with pytest.raises(bevel.errors.CaptureError, match="flex_attention.*attn_implementation='sdpa'"):
        bevel.compile(model, "cleanup", example_inputs=(ids, mask))
    assert model.config._attn_implementation == "flex_attention"


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_a_sliding_window_is_kept_in_prefill_and_generation(kind):
    # a window of 4 over prompts of up to 11 tokens and 12 new ones: most keys fall out of it
    model = small_causal_lm(kind, seed=3, sliding_window=4)
    if kind == "qwen2":
        assert model.config.layer_types == ["full_attention", "sliding_attention"]
    ids, mask = padded_prompts([11, 4, 8], seed=4)
    assert_prefill_and_generation_match_hf(model, ids, mask)


def test_prefill_and_decode_graphs_share_the_weights_and_write_the_cache_in_place(llama):
    _, cm = llama
    weights = dict(cm.graph_module.named_parameters())
    for graph in (cm.prefill_graph, cm.decode_graph):
        assert graph.graph is not cm.graph_module.graph
        assert all(p is weights[name] for name, p in graph.named_parameters())
        assert graph.code.count("index_copy_.default") == 2 * cm.spec.num_layers
    ids, mask = padded_prompts([4, 2], seed=14)
    inputs = prefill_inputs(cm.spec, ids, mask, cache_len=8)
    out = cm.prefill_graph(*inputs)
    assert out[1].data_ptr() == inputs[4].data_ptr() and inputs[4].abs().max() > 0
    assert "_assert_tensor_metadata" not in cm.decode_graph.code and "_guards_fn" not in cm.decode_graph.code


def test_rows_stop_at_eos_and_are_padded_as_hf_pads_them(llama):
    model, cm = llama
    ids, mask = padded_prompts([4, 7, 2], seed=7)
    free = cm.generate(ids, max_new_tokens=12, attention_mask=mask, eos_token_id=None)
    eos = int(free[1, ids.shape[1] + 3])  # a token row 1 emits: make it the end of text
    out = cm.generate(ids, max_new_tokens=12, attention_mask=mask, eos_token_id=eos)
    expected = hf_greedy(model, ids, mask, 12, eos=eos)
    assert torch.equal(out, expected)
    stop = ids.shape[1] + int((free[1, ids.shape[1]:] == eos).nonzero()[0])  # its first emission
    assert out[1, stop] == eos and (out[1, stop + 1:] == PAD).all()


def test_all_rows_finished_ends_the_loop_early(llama):
    _, cm = llama
    ids, mask = padded_prompts([3], seed=8)
    first = int(cm.generate(ids, max_new_tokens=1, attention_mask=mask)[0, -1])
    out = cm.generate(ids, max_new_tokens=10, attention_mask=mask, eos_token_id=first)
    assert out.shape == (1, ids.shape[1] + 1)


def test_an_unpadded_prompt_needs_no_mask_and_right_padding_is_realigned(llama):
    model, cm = llama
    ids, mask = padded_prompts([6, 4], seed=9)
    left = cm.generate(ids, max_new_tokens=6, attention_mask=mask, eos_token_id=None)
    # the same prompts right-padded: generate moves the padding to the left itself
    right_ids = torch.stack([torch.cat([r[m.bool()], r[~m.bool()]]) for r, m in zip(ids, mask)])
    right_mask = torch.stack([torch.cat([m[m.bool()], m[~m.bool()]]) for m in mask])
    assert torch.equal(cm.generate(right_ids, max_new_tokens=6, attention_mask=right_mask, eos_token_id=None), left)
    single = cm.generate(ids[0], max_new_tokens=6, eos_token_id=None)
    assert torch.equal(single[0], left[0])


def test_logits_come_back_in_the_input_order(llama):
    model, cm = llama
    ids, mask = padded_prompts([6, 4], seed=10)
    right_ids = torch.stack([torch.cat([r[m.bool()], r[~m.bool()]]) for r, m in zip(ids, mask)])
    right_mask = torch.stack([torch.cat([m[m.bool()], m[~m.bool()]]) for m in mask])
    left_logits, right_logits = cm(ids, mask), cm(right_ids, right_mask)
    assert torch.allclose(left_logits[mask.bool()], right_logits[right_mask.bool()], atol=1e-5)


def test_sampling(llama):
    _, cm = llama
    ids, mask = padded_prompts([5, 5], seed=11)
    greedy = cm.generate(ids, max_new_tokens=8, attention_mask=mask, eos_token_id=None)
    top1 = cm.generate(ids, max_new_tokens=8, attention_mask=mask, eos_token_id=None, temperature=0.7, top_k=1,
                       seed=0)
    assert torch.equal(top1, greedy)  # only the most likely token is left to sample
    a = cm.generate(ids, max_new_tokens=8, attention_mask=mask, eos_token_id=None, temperature=1.5, seed=3)
    b = cm.generate(ids, max_new_tokens=8, attention_mask=mask, eos_token_id=None, temperature=1.5, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, greedy)  # 16 tokens from a 300-token vocabulary at temperature 1.5


def test_generate_after_save_and_load(llama, tmp_path):
    _, cm = llama
    ids, mask = padded_prompts([5, 2, 8], seed=12)
    expected = cm.generate(ids, max_new_tokens=10, attention_mask=mask, eos_token_id=None)
    cm.save(str(tmp_path / "art"))
    loaded = bevel.load(str(tmp_path / "art"))
    assert type(loaded).__name__ == "CompiledDecoder" and loaded.spec == cm.spec
    # the loaded graphs still write the cache in place (a functional copy of every cache per token is slow)
    assert loaded.decode_graph.code.count("index_copy_.default") == 2 * cm.spec.num_layers
    assert torch.equal(loaded.generate(ids, max_new_tokens=10, attention_mask=mask, eos_token_id=None), expected)


def test_the_decode_step_runs_in_onnxruntime_with_the_cache_as_inputs_and_outputs(llama, tmp_path):
    import onnxruntime as ort

    _, cm = llama
    path = str(tmp_path / "decoder.onnx")
    cm.export_onnx(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = cache_names(cm.spec.num_layers)
    assert [i.name for i in session.get_inputs()] == ["input_ids", "position_ids", "cache_position", "kv_positions",
                                                     *names]
    assert [o.name for o in session.get_outputs()] == ["logits", *cache_names(cm.spec.num_layers, "present")]
    # prefill in torch, then one decode step (one token per row, other batch size and cache length) in both
    ids, mask = padded_prompts([5, 3], seed=13)
    inputs = prefill_inputs(cm.spec, ids, mask, cache_len=11)
    cache = [cm.step(*inputs)[n] for n in cache_names(cm.spec.num_layers, "present")]
    kv_positions = inputs[3].clone()
    kv_positions[:, 5] = inputs[1][:, -1] + 1
    step = (torch.tensor([[17], [42]]), inputs[1][:, -1:] + 1, torch.tensor([5]), kv_positions, *cache)
    expected = cm.step(*step)
    got = session.run(None, {name: t.numpy() for name, t in zip([i.name for i in session.get_inputs()], step)})
    assert abs(got[0] - expected["logits"].numpy()).max() < 1e-4
    for value, name in zip(got[1:], cache_names(cm.spec.num_layers, "present")):
        assert abs(value - expected[name].numpy()).max() < 1e-4
    assert abs(got[1][:, :, 5] - expected["present_key_0"][:, :, 5].numpy()).max() < 1e-4  # the new entry


def test_a_model_with_several_end_tokens_stops_on_any_and_keeps_them_through_save_and_load(tmp_path):
    """HF configs list several ids where a model ends text with any of them (Llama 3's, for one)."""
    model = small_causal_lm("llama", seed=5)
    ids, mask = padded_prompts([5, 9, 1, 7], seed=6)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=PAD)[:, ids.shape[1]:]
    ends = [int(free[0, 2]), int(free[1, 5])]  # tokens rows 0 and 1 emit, so both rows stop early
    model.config.eos_token_id = ends
    cm = bevel.compile(model, "cleanup", example_inputs=(ids, mask))
    assert cm.spec.eos_token_id == tuple(ends)
    expected = hf_greedy(model, ids, mask, 12, eos=ends)
    assert torch.equal(cm.generate(ids, max_new_tokens=12, attention_mask=mask), expected)
    assert (expected[0, ids.shape[1] + 3:] == PAD).all()  # row 0 did stop at its end token
    loaded = bevel.load(cm.save(str(tmp_path / "artifact")))
    assert loaded.spec.eos_token_id == tuple(ends)
    assert torch.equal(loaded.generate(ids, max_new_tokens=12, attention_mask=mask), expected)


def test_a_model_with_a_table_of_position_embeddings_is_held_to_its_positions(tmp_path):
    """GPT-2's positions index a table of max_positions rows: past it, the lookup failed inside torch
    (a windowed cache, which never fills, still counts positions up). Rotary models have no table."""
    model = small_causal_lm("gpt2", max_positions=32)
    ids, mask = padded_prompts([5, 3])
    with pytest.raises(bevel.errors.BevelError, match="max_cache_len=40 is beyond the 32 positions of GPT2LMHead"):
        bevel.compile(model, "cleanup", example_inputs=(ids, mask), max_cache_len=40)
    windowed = bevel.compile(model, "attention.window(window=8, sinks=2)", example_inputs=(ids, mask))
    assert windowed.generate(ids, 27, attention_mask=mask, eos_token_id=None).shape == (2, 32)
    loaded = bevel.load(windowed.save(str(tmp_path / "artifact")))
    for compiled in (windowed, loaded):
        with pytest.raises(GenerateError, match="5 \\+ 28 = 33 tokens\\) goes past the model's 32 positions"):
            compiled.generate(ids, 28, attention_mask=mask)
    rotary = bevel.compile(small_causal_lm("llama", max_positions=32), "cleanup", example_inputs=(ids, mask))
    assert rotary.spec.max_positions is None


@pytest.mark.parametrize("call, message", [
    (lambda cm, ids: cm.generate(torch.zeros(2, 0, dtype=torch.long), 4), "the prompt is empty"),
    (lambda cm, ids: cm.generate(ids, 0), "max_new_tokens=0 must be an integer of at least 1"),
    (lambda cm, ids: cm.generate(ids, -3), "max_new_tokens=-3"),
    (lambda cm, ids: cm.generate(ids, 2.5), "max_new_tokens=2.5"),
    (lambda cm, ids: cm.generate(torch.randint(3, 300, (1, 60)), 4), "the prompt \\(60 tokens\\) does not fit the KV "
                                                                      "cache of 48 tokens"),
    (lambda cm, ids: cm.generate(ids, 45), "the prompt plus max_new_tokens \\(5 \\+ 45 = 50 tokens\\) does not fit"),
    (lambda cm, ids: cm.generate(ids.float(), 4), "input_ids must be an integer tensor"),
    (lambda cm, ids: cm.generate([1, 2, 3], 4), "input_ids must be an integer tensor of token ids, got list"),
    (lambda cm, ids: cm.generate(ids + 1000, 4), "outside the vocabulary \\[0, 300\\)"),
    (lambda cm, ids: cm.generate(ids, 4, temperature=-1.0), "temperature=-1.0 must be a finite number >= 0"),
    (lambda cm, ids: cm.generate(ids, 4, temperature=float("nan")), "temperature=nan must be a finite number"),
    (lambda cm, ids: cm.generate(ids, 4, eos_token_id="2"), "eos_token_id='2' must be None, a token id or a list"),
    (lambda cm, ids: cm.generate(ids, 4, eos_token_id=[5, -1]), "eos_token_id=\\[5, -1\\] must be None"),
    (lambda cm, ids: cm.generate(ids, 4, eos_token_id=[]), "eos_token_id=\\[\\] must be None"),
    (lambda cm, ids: cm.generate(ids, 4, temperature=1.0, top_k=0), "top_k=0"),
    (lambda cm, ids: cm.generate(ids, 4, attention_mask=torch.zeros_like(ids)), "at least one real token per row"),
    (lambda cm, ids: cm.generate(ids.unsqueeze(0), 4), "must be \\[batch, tokens\\]"),
])
def test_bad_generate_calls_are_named(llama, call, message):
    _, cm = llama
    ids = torch.randint(3, 300, (2, 5))
    with pytest.raises(GenerateError, match=message):
        call(cm, ids)


def test_a_decode_stream_driven_out_of_order_says_how(llama):
    """Before, a step before the prefill ran on an empty cache silently, a second prefill ran again,
    and a bad token or a step past the stream's length failed inside torch (embedding, index_copy)."""
    _, cm = llama
    ids = torch.randint(3, 300, (2, 5))
    stream = cm.stream(ids, 2)
    with pytest.raises(GenerateError, match=r"step\(\) before prefill\(\)"):
        stream.step(torch.tensor([4, 5]))
    stream.prefill()
    with pytest.raises(GenerateError, match=r"prefill\(\) already ran on this stream"):
        stream.prefill()
    for token, message in [(torch.tensor([4.0, 5.0]), r"an integer tensor of shape \(2,\); got torch.float32"),
                           (torch.tensor([4]), r"of shape \(2,\); got torch.int64 of shape \(1,\)"),
                           ([4, 5], "got list"),
                           (torch.tensor([4, 300]), r"token 300, outside the vocabulary \[0, 300\)")]:
        with pytest.raises(GenerateError, match=message):
            stream.step(token)
    first, second = stream.step(torch.tensor([4, 5])), stream.step(torch.tensor([6, 7]))
    assert first.shape == second.shape == (2, 300)
    with pytest.raises(GenerateError, match="opened for 2 new tokens and all were fed"):
        stream.step(torch.tensor([8, 9]))
