"""Eager references for the attention and KV-cache passes: tinylm run by transformers itself, with each
layer's attention replaced by dense SDPA under a boolean mask the test states (and keys and values
optionally transformed first), over the whole sequence without a cache."""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F

# rule(layer, q [B, H, T, D], k [B, Hkv, L, D], v) -> (mask [B or 1, H, T, L] bool, k, v)
Rule = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
_NAME = "bevel_test_reference"
_active: list[Rule] = []


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    rule = _active[-1]
    mask, key, value = rule(module.layer_idx, query, key, value)
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_NAME, _attention)


def reference_model(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of an HF Llama-family model whose attention :func:`masked_logits` controls."""
    _register()
    ref = copy.deepcopy(model)
    ref.config._attn_implementation = _NAME
    for module in ref.modules():
        if hasattr(module, "config"):
            module.config._attn_implementation = _NAME
    return ref


@torch.no_grad()
def masked_logits(ref: torch.nn.Module, ids: torch.Tensor, rule: Rule) -> torch.Tensor:
    """Logits [B, T, V] of ``ref`` on unpadded ``ids`` (positions 0..T-1) with attention by ``rule``."""
    _active.append(rule)
    try:
        return ref(ids, use_cache=False).logits
    finally:
        _active.pop()


def causal(t: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key positions [T, 1], [1, L] of an unpadded sequence (queries are its last T tokens)."""
    q = torch.arange(length - t, length)[:, None]
    return q, torch.arange(length)[None, :]


def window_rule(window: list[int], sinks: list[int]) -> Rule:
    """Per-head window and sinks (0: no window), as StreamingLLM masks them; one value for all heads."""

    def rule(layer, q, k, v):
        heads = q.shape[1]
        w = torch.tensor(window * heads if len(window) == 1 else window)[:, None, None]
        s = torch.tensor(sinks * heads if len(sinks) == 1 else sinks)[:, None, None]
        qp, kp = causal(q.shape[2], k.shape[2])
        mask = (kp <= qp) & ((w <= 0) | (qp - kp < w) | (kp < s))
        return mask[None], k, v

    return rule
