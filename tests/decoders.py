"""Small random-weight causal LMs (HF Llama, Qwen2, GPT-2 configs) and padded prompt batches for the
decoder tests. Nothing is downloaded: the configs are built here."""

from __future__ import annotations

import torch

VOCAB = 300
PAD = 0


def small_causal_lm(kind: str = "llama", seed: int = 0, layers: int = 2, max_positions: int = 64,
                    sliding_window: int | None = None) -> torch.nn.Module:
    """A 2-layer, 64-wide causal LM of the given family with random weights, in eval mode; grouped-query
    attention (4 query heads, 2 KV heads) where the family has it. With ``sliding_window``, "mistral"
    slides in every layer and "qwen2" in all but its first (its config then lists each layer's kind)."""
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=PAD)
    if kind == "llama":
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=max_positions, **common)
        model = LlamaForCausalLM(config)
    elif kind == "qwen2":
        window = {}
        if sliding_window:
            window = dict(use_sliding_window=True, sliding_window=sliding_window, max_window_layers=1)
        config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=max_positions, **window, **common)
        model = Qwen2ForCausalLM(config)
    elif kind == "mistral":
        config = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=max_positions,
                               sliding_window=sliding_window, **common)
        model = MistralForCausalLM(config)
    elif kind == "gpt2":
        config = GPT2Config(n_embd=64, n_layer=layers, n_head=4, n_positions=max_positions, **common)
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(kind)
    return model.eval()


def padded_prompts(lengths: list[int], seed: int = 0, vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of random prompts of these lengths, left-padded with ``PAD``;
    the tokens avoid the pad, BOS and EOS ids."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length:] = torch.randint(3, vocab, (length,), generator=generator)
        mask[row, width - length:] = 1
    return ids, mask


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Each token's position within its own (left-padded) sequence, as HF generate computes it."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


def hf_greedy(model, ids, mask, new, eos=None):
    """HF's own greedy continuation of a left-padded batch."""
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=eos,
                          pad_token_id=PAD)


def assert_prefill_and_generation_match_hf(model, ids, mask, pipeline="cleanup", **compile_args):
    """The model compiled with ``pipeline``: its prefill logits at real tokens (1e-5: float32 summation
    order) and its greedy continuation equal the model's own; returns the compiled model."""
    import bevel

    cm = bevel.compile(model, pipeline, example_inputs=(ids, mask), **compile_args)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, position_ids=positions_of(mask)).logits
    real = mask.bool()
    assert torch.allclose(cm(ids, mask)[real], expected[real], atol=1e-5)
    assert torch.equal(cm.generate(ids, max_new_tokens=12, attention_mask=mask, eos_token_id=None),
                       hf_greedy(model, ids, mask, 12))
    return cm
