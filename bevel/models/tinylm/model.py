"""tinylm's architecture: a 12-layer Llama decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention)
over bytes, built as a ``transformers.LlamaForCausalLM`` so that everything that takes an HF causal
LM (capture, ``generate``, the eager baselines) takes it unchanged."""

from __future__ import annotations

import os
from typing import Any

from bevel.errors import ModelLoadError
from bevel.models.tinylm.corpus import EOS, VOCAB_SIZE

# 4.8M parameters: 18.6 MB as float32 safetensors. Heads of 32 dims, 6 query heads sharing 2 KV heads.
CONFIG: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE, hidden_size=192, intermediate_size=512, num_hidden_layers=12,
    num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0,
    rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=None, eos_token_id=EOS, pad_token_id=EOS,
)


def llama_classes() -> tuple[Any, Any]:
    """(LlamaConfig, LlamaForCausalLM), with a clear error when transformers is missing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        raise ModelLoadError("the built-in model 'tinylm' needs transformers: pip install 'bevel[dev]'") from None
    return LlamaConfig, LlamaForCausalLM


def build_untrained(seed: int = 0, **overrides: Any) -> Any:
    """A tinylm with fresh random weights (what training starts from); ``overrides`` change the config."""
    import torch

    config_cls, model_cls = llama_classes()
    torch.manual_seed(seed)
    config = config_cls(**{**CONFIG, **overrides})
    config._attn_implementation = "sdpa"
    return model_cls(config)
