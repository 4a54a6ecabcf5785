"""lowrank and prune.nm on the real all-MiniLM-L6-v2: fidelity of the sentence embeddings, size, and
ONNX export in onnxruntime.

Fidelity is measured as the sentence-transformers model is used: mean-pooled last hidden states on
256 real sentences none of which is among the calibration sentences; the figure is the minimum
cosine against the original model over those sentences.

The pruning issue asks ``lowrank`` at 80% energy to keep a minimum cosine of 0.97, and it does not.
Both pipelines are compiled with the calibration sentences, so ``lowrank`` truncates each layer in
the space whitened by its calibration inputs (SVD-LLM) and ``energy`` is the fraction of each
layer's output energy ``||W X||^2`` kept. MiniLM's layer outputs are dominated by a few directions:
80% of that energy needs about 4% of the layers' weights, and the embeddings lose almost all
fidelity (min cosine about 0.07 measured). Measured on this test's sentences, energy -> (min cosine,
factorized layers' weights kept): 0.9 -> (0.17, 10%), 0.95 -> (0.22, 20%), 0.99 -> (0.54, 55%);
at 0.999 only 6 layers still lower their FLOPs (to 86% of their weights; 0.91) and at 0.9999 none.
The whitening does help at a given size: at param_ratio=0.5 the min cosine is 0.49 whitened against
0.18 for plain SVD of the weights, whose 80% of weight energy (no calibration) keeps 59% of the
weights for 0.26. No setting that factorizes the model reaches 0.97, so the target stays asserted
below as an expected failure.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import bevel
from bevel.data import sentences
from bevel.models import minilm as minilm_model

LOWRANK = "lowrank(energy=0.8)"
NM = 'prune.nm(n=2, m=4, importance="activation")'


@pytest.fixture(scope="module")
def calibration_texts():
    """32 real sentences (about 1,000 tokens), the calibration batches of both pipelines."""
    return sentences(32, seed=1)


@pytest.fixture(scope="module")
def held_out(calibration_texts):
    texts, batches = minilm_model.held_out_batches(256, batch_size=32, exclude=calibration_texts)
    assert len(texts) == 256 and not set(texts) & set(calibration_texts)
    return batches


@pytest.fixture(scope="module")
def reference_embeddings(minilm, held_out):
    return minilm_model.sentence_embeddings(minilm, held_out)


@pytest.fixture(scope="module")
def compiled(minilm, minilm_inputs, calibration_texts):
    """Each pipeline compiled once, lazily, with the calibration sentences: prune.nm's activation norms
    and lowrank's whitening are measured on them."""
    calibration = [minilm_model.encode(calibration_texts[i:i + 16]) for i in range(0, len(calibration_texts), 16)]
    cache = {}

    def get(pipeline):
        if pipeline not in cache:
            cache[pipeline] = bevel.compile(minilm, pipeline, example_inputs=minilm_inputs, calibration=calibration)
        return cache[pipeline]

    return get


@pytest.fixture(scope="module")
def min_cosine(compiled, held_out, reference_embeddings):
    """The minimum embedding cosine of each pipeline, measured once."""
    cache = {}

    def get(pipeline):
        if pipeline not in cache:
            embeddings = minilm_model.sentence_embeddings(compiled(pipeline), held_out)
            cache[pipeline] = float(torch.nn.functional.cosine_similarity(embeddings, reference_embeddings).min())
        return cache[pipeline]

    return get


def test_lowrank_at_80_percent_energy_factorizes_every_layer_and_shrinks_the_model(compiled, min_cosine):
    module = compiled(LOWRANK)
    entry = module.report["lowrank"]
    assert entry.status == "applied", entry.reason
    stats = entry.stats
    before, after = entry.before.params, entry.after.params
    layer_before, layer_after = stats["layer_params"]
    print(f"{LOWRANK}: min cosine {min_cosine(LOWRANK):.4f} over 256 held-out sentences; "
          f"{stats['factorized']} layers factorized, their weights {layer_after / layer_before:.1%} of before; "
          f"model parameters {before} -> {after} ({1 - after / before:.1%} fewer)")
    assert stats["whitened"]  # calibrated: truncated where each layer's outputs lose least
    assert stats["factorized"] == 37 and not stats["left"]  # the FLOPs rule excludes no layer at this energy
    assert after < before and entry.after.flops < entry.before.flops
    assert all(layer["energy"] >= 0.8 for layer in stats["layers"].values())


@pytest.mark.xfail(strict=True, reason="80% of each layer's output energy keeps too little of MiniLM "
                                       "(see the module docstring); the issue's target is not met")
def test_lowrank_at_80_percent_energy_keeps_min_cosine_0_97(min_cosine):
    assert min_cosine(LOWRANK) >= 0.97


def test_nm_2_4_with_activation_importance_runs_on_minilm(compiled, min_cosine):
    module = compiled(NM)
    entry = module.report["prune.nm"]
    assert entry.status == "applied", entry.reason
    weights = dict(module.graph_module.named_parameters())
    for name in entry.stats["layers"]:
        blocks = (weights[name] != 0).reshape(weights[name].shape[0], -1, 4).sum(-1)
        assert (blocks == 2).all(), name
    print(f"{NM}: min cosine {min_cosine(NM):.4f} over 256 held-out sentences; "
          f"{len(entry.stats['layers'])} layers at 2:4, layer-weight sparsity {entry.after.sparsity:.3f}")
    assert len(entry.stats["layers"]) == 37
    assert np.isfinite(min_cosine(NM))


@pytest.mark.parametrize("pipeline", [LOWRANK, NM], ids=["lowrank", "nm"])
def test_onnx_export_runs_in_onnxruntime_and_agrees(compiled, pipeline, held_out, tmp_path):
    module = compiled(pipeline)
    path = module.export_onnx(str(tmp_path / "model.onnx"))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    ids, mask = held_out[0]
    onnx_hidden = session.run(None, dict(zip(names, (ids.numpy(), mask.numpy()))))[0]
    pooled_onnx = minilm_model.mean_pooled((torch.from_numpy(np.asarray(onnx_hidden)),), mask)
    pooled = minilm_model.mean_pooled(module(ids, mask), mask)
    cosine = float(torch.nn.functional.cosine_similarity(pooled_onnx, pooled).min())
    print(f"{pipeline}: onnxruntime vs CompiledModule min cosine {cosine:.6f}")
    assert cosine >= 0.999
