"""Perplexity of a causal LM on a text, with a sliding window so that texts longer than the context
are scored with as much context as the window allows."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from bevel.errors import BevelError


def causal_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [batch, seq, vocab] of ``model`` on ``input_ids``: an HF causal LM, a module returning
    logits (or a tuple starting with them), or a compiled decoder."""
    out = model(input_ids)
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def token_ids(text: str | torch.Tensor, tokenizer: Callable[[str], Any] | None) -> torch.Tensor:
    """A 1-D id tensor: ``text`` itself if it holds ids, else its tokens (UTF-8 bytes by default,
    tinylm's vocabulary)."""
    if isinstance(text, torch.Tensor):
        return text.reshape(-1).long()
    if tokenizer is None:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    ids = tokenizer(text)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


@torch.no_grad()
def perplexity(model: Any, text: str | torch.Tensor, context: int = 512, stride: int = 256,
               tokenizer: Callable[[str], Any] | None = None, max_tokens: int | None = None) -> float:
    """exp of the mean next-token negative log-likelihood of ``text`` under ``model``.

    Windows of ``context`` tokens advance by ``stride``; each window scores only the tokens that the
    previous one did not (so every token after the first is scored once, with at least
    ``context - stride`` tokens before it once the text is long enough). ``max_tokens`` cuts the
    text first, for quick measurements. Lower is better; a uniform guess over V tokens scores V.
    """
    if not 0 < stride <= context:
        raise BevelError(f"perplexity needs 0 < stride <= context, got stride={stride}, context={context}")
    ids = token_ids(text, tokenizer)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise BevelError("perplexity needs a text of at least two tokens")
    total_nll, scored, previous_end = 0.0, 0, 0
    for begin in range(0, ids.numel() - 1, stride):
        end = min(begin + context, ids.numel())
        window = ids[begin:end].unsqueeze(0)
        logits = causal_logits(model, window).float()
        # score the targets at positions previous_end..end-1 (predicted from the position before each)
        first = max(previous_end, begin + 1) - begin
        targets = window[0, first:]
        log_probs = torch.log_softmax(logits[0, first - 1:-1], dim=-1)
        total_nll -= log_probs.gather(1, targets.unsqueeze(1)).sum().item()
        scored += targets.numel()
        previous_end = end
        if end == ids.numel():
            break
    return math.exp(total_nll / scored)


def unigram_perplexity(train: str | torch.Tensor, text: str | torch.Tensor, vocab_size: int = 256) -> float:
    """Perplexity of ``text`` under the token frequencies of ``train`` (add-one smoothed): the
    baseline a language model must beat by a wide margin."""
    counts = torch.bincount(token_ids(train, None), minlength=vocab_size).double() + 1
    log_probs = (counts / counts.sum()).log()
    ids = token_ids(text, None)
    return math.exp(-log_probs[ids].mean().item())
