"""tinylm: a small trained byte-level Llama decoder that ships with bevel, for measuring what passes
cost a real language model offline. See ``README.md`` beside this file for how it was trained."""

from __future__ import annotations

import json
import pathlib

import torch

from bevel.errors import ModelLoadError
from bevel.models.tinylm.corpus import EOS, decode, encode, held_out_text
from bevel.models.tinylm.model import CONFIG, build_untrained

WEIGHTS = pathlib.Path(__file__).parent / "weights" / "model.safetensors"
METRICS = pathlib.Path(__file__).parent / "weights" / "metrics.json"


def load_tinylm() -> torch.nn.Module:
    """tinylm with its trained weights (a ``transformers.LlamaForCausalLM``), in eval mode."""
    from safetensors.torch import load_file

    if not WEIGHTS.is_file():
        raise ModelLoadError(f"tinylm's weights are missing from the package ({WEIGHTS.name}); reinstall bevel "
                             f"or train them with: python -m bevel.models.tinylm.train")
    model = build_untrained()
    state = load_file(str(WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # the output head is tied to the token table, which is stored once
    if unexpected or [name for name in missing if name != "lm_head.weight"]:
        raise ModelLoadError(f"tinylm's weights do not fit its architecture (missing {missing}, unexpected "
                             f"{unexpected}); retrain them with: python -m bevel.models.tinylm.train")
    model.tie_weights()
    return model.eval()


def training_metrics() -> dict:
    """What the training run recorded: held-out perplexity and the settings it used."""
    return json.loads(METRICS.read_text())


def prompts(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of texts as bytes, left-padded with the end-of-text id."""
    encoded = [encode(text) for text in texts]
    length = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(texts), length), EOS, dtype=torch.long)
    mask = torch.zeros((len(texts), length), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, length - len(ids):] = ids
        mask[row, length - len(ids):] = 1
    return input_ids, mask


def calibration_batches(count: int = 4, batch_size: int = 4, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of prompts: English sentences from Python's documentation, as bytes."""
    from bevel.data import sentences

    texts = sentences(count * batch_size, seed=seed, max_words=40)
    return [prompts(texts[i * batch_size:(i + 1) * batch_size]) for i in range(count)]


def text_windows(count: int = 4, batch_size: int = 4, length: int = 256, seed: int = 1) -> list[tuple[torch.Tensor]]:
    """``count`` batches of ``length``-byte windows of the training text (no padding): calibration
    for passes that score layers or heads on running text."""
    from bevel.models.tinylm.corpus import training_stream

    stream = training_stream()
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - length, (count, batch_size), generator=generator)
    return [(torch.stack([stream[s:s + length] for s in row.tolist()]),) for row in starts]


def build() -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The built-in MODEL ``tinylm``: the model and a batch of two prompts of different lengths."""
    return load_tinylm(), prompts(["The object model of Python", "A function"])


__all__ = ["CONFIG", "EOS", "build", "calibration_batches", "decode", "encode", "held_out_text", "load_tinylm",
           "prompts", "text_windows", "training_metrics"]
