"""Perplexity through a compiled decoder's decode loop: the prompt prefilled, then every later token
fed one step at a time, so that what the loop keeps in its cache (a ring buffer, evicted entries,
quantized codes) decides the score, as it would in generation."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from bevel.errors import BevelError
from bevel.eval.perplexity import token_ids


@torch.no_grad()
def decode_perplexity(compiled: Any, text: str | torch.Tensor, prompt: int = 64, tokens: int = 512,
                      tokenizer: Callable[[str], Any] | None = None) -> float:
    """exp of the mean next-token negative log-likelihood of the ``tokens`` tokens of ``text`` after its
    first ``prompt`` ones, scored by ``compiled`` (a ``CompiledDecoder``) prefilling the prompt and
    then decoding each token of the text in turn (teacher forcing)."""
    ids = token_ids(text, tokenizer)
    if prompt < 1 or tokens < 1 or ids.numel() < prompt + tokens:
        raise BevelError(f"decode_perplexity needs prompt >= 1, tokens >= 1 and a text of at least prompt + tokens "
                         f"= {prompt + tokens} tokens, got prompt={prompt}, tokens={tokens} and {ids.numel()} tokens")
    ids = ids[:prompt + tokens].unsqueeze(0)
    stream = compiled.stream(ids[:, :prompt], tokens - 1)
    logits = stream.prefill()
    total = 0.0
    for index in range(tokens):
        target = ids[:, prompt + index]
        total -= torch.log_softmax(logits.float(), dim=-1).gather(1, target[:, None]).sum().item()
        if index < tokens - 1:
            logits = stream.step(target)
    return math.exp(total / tokens)
