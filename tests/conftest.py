"""Shared fixtures: the real MiniLM model, real sentences as inputs, one compiled MiniLM reused across
tests, and the shipped tinylm with its one capture."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PRUNE_PIPELINE = "cleanup | prune.magnitude(sparsity=0.3)"


@pytest.fixture(scope="session")
def minilm():
    """all-MiniLM-L6-v2 with real weights. Tests must not modify it (bevel.compile copies it)."""
    from bevel.models.minilm import load_minilm

    return load_minilm()


@pytest.fixture(scope="session")
def minilm_inputs():
    """(input_ids, attention_mask) for 4 real sentences: the example inputs of every MiniLM compile."""
    from bevel.models.minilm import example_inputs

    return example_inputs(batch_size=4, seed=0)


@pytest.fixture(scope="session")
def minilm_calibration():
    """Four batches of 8 real sentences, disjoint from the example inputs' sample."""
    from bevel.models.minilm import calibration_batches

    return calibration_batches(count=4, batch_size=8, seed=1)


@pytest.fixture(scope="session")
def fresh_sentences():
    """A batch of real sentences of another batch size and length than the example inputs."""
    from bevel.data import sentences
    from bevel.models.minilm import encode

    return encode(sentences(7, seed=11))


@pytest.fixture(scope="session")
def minilm_pruned(minilm, minilm_inputs, minilm_calibration):
    """MiniLM compiled once with cleanup | prune.magnitude(sparsity=0.3); shared, do not modify."""
    import bevel

    return bevel.compile(minilm, PRUNE_PIPELINE, example_inputs=minilm_inputs, calibration=minilm_calibration)


@pytest.fixture(scope="session")
def tinylm_model():
    """The shipped tinylm (a 12-layer byte-level llama). Tests must not modify it."""
    from bevel.models import tinylm

    return tinylm.load_tinylm()


@pytest.fixture(scope="session")
def tinylm_captured(tinylm_model):
    """tinylm captured once (``bevel.capture``: about 10 s, the same for every pipeline) on two prompts;
    each compile of it rewrites a copy of the graph."""
    import bevel
    from bevel.models import tinylm

    return bevel.capture(tinylm_model, tinylm.prompts(["The object model", "A function"]))
