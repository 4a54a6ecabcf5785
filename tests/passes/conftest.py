"""Fixtures of the pass tests: small captured models and MiniLM's held-out sentences, shared by the
token reducing pass tests (captures are slow; every test rewrites a copy)."""

from __future__ import annotations

import pytest

from tests.passes.token_reduction import captured, small_bert, small_vit


@pytest.fixture(scope="session")
def bert_captured():
    """A random HF BERT on padded inputs, captured; do not modify (rewrite ``graph.copy()``)."""
    return small_bert()


@pytest.fixture(scope="session")
def vit_captured():
    """A random 4-block timm ViT-Tiny, captured; do not modify (rewrite ``graph.copy()``)."""
    return small_vit()


@pytest.fixture(scope="session")
def minilm_captured(minilm, minilm_inputs):
    """The real MiniLM captured on its example sentences; do not modify (rewrite ``graph.copy()``)."""
    return captured(minilm, minilm_inputs)


@pytest.fixture(scope="session")
def minilm_held_out(minilm):
    """64 held-out sentences in batches of 32, and their mean-pooled embeddings under the original model."""
    from bevel.models.minilm import held_out_batches, sentence_embeddings

    _, batches = held_out_batches(64, batch_size=32)
    return batches, sentence_embeddings(minilm, batches)
