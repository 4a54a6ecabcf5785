"""A long-context needle check: a fact placed early in a long prompt is asked for at its end.

Each trial hides a random number in a sentence ("The secret code of <name> is 4721."), buries it
under filler text, then repeats the sentence's start; the model must complete the number greedily.
"""

from __future__ import annotations

import random
from typing import Any

_NAMES = ["the archive", "the garden", "the tower", "the river", "the library", "the harbour", "the mill"]


def needle_prompts(count: int, filler: str, filler_chars: int, seed: int = 0) -> list[tuple[str, str]]:
    """``count`` (prompt, answer) pairs: the needle, ``filler_chars`` characters of ``filler`` taken
    from a random place, then the question."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        name, code = rng.choice(_NAMES), str(rng.randint(1000, 9999))
        start = rng.randint(0, max(0, len(filler) - filler_chars))
        hay = filler[start:start + filler_chars]
        prefix = f"The secret code of {name} is"
        pairs.append((f"{prefix} {code}.\n{hay}\n{prefix}", " " + code))
    return pairs


def needle_check(model: Any, filler: str, filler_chars: int = 300, count: int = 8, seed: int = 0) -> float:
    """The fraction of trials in which greedy decoding reproduces the hidden number exactly.

    ``model`` is a compiled decoder (anything with ``generate(input_ids, max_new_tokens)``) or an HF
    causal LM; prompts are UTF-8 bytes, tinylm's vocabulary.
    """
    import torch

    from bevel.models.tinylm.corpus import decode, encode
    from bevel.runtime.compiled_decoder import CompiledDecoder

    hits = 0
    for prompt, answer in needle_prompts(count, filler, filler_chars, seed):
        ids = encode(prompt).unsqueeze(0)
        steps = len(answer.encode("utf-8"))
        if isinstance(model, CompiledDecoder) or not isinstance(model, torch.nn.Module):
            out = model.generate(ids, max_new_tokens=steps)
        else:  # an HF model: its own greedy search
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False)
        hits += decode(out[0, ids.shape[1]:]) == answer
    return hits / count
