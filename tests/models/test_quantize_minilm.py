"""The quantize passes on the real all-MiniLM-L6-v2: fidelity of the sentence embeddings, ONNX
export in onnxruntime with file sizes, and a saved artifact in a fresh process.

Fidelity is measured as the sentence-transformers model is used: mean-pooled last hidden states,
on 256 real sentences none of which is among the calibration sentences; the figure is the minimum
cosine over those sentences (the thresholds are the ones the quantization issue sets).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

import bevel
from bevel.data import sentences
from bevel.models import minilm as minilm_model

PIPELINES = {
    "int8_weight": "quantize.int8_weight",
    # 8-bit codes on every CPU (the pass's default is 7 on CPUs without VNNI, measured beside it)
    "int8_dynamic": "quantize.int8_dynamic(smooth=0.5, activation_bits=8)",
    "int8_dynamic_7bit": "quantize.int8_dynamic(smooth=0.5, activation_bits=7)",
    # with 4-bit embedding tables: the token table alone is 11.7 MB in int8, more than half of a 20% file.
    # One GPTQ compile (a minute) serves the cosine, the file size and the fresh-process checks; against
    # round-to-nearest with int8 tables it is the harder comparison (on these sentences GPTQ's minimum
    # cosine was 0.974 with int8 tables, 0.976 with 4-bit ones)
    "int4_gptq": 'quantize.int4_weight(group_size=64, method="gptq", embedding_bits=4)',
    "int4_rtn": 'quantize.int4_weight(group_size=64, method="rtn")',
}


@pytest.fixture(scope="module")
def calibration_texts():
    """512 real sentences (about 15k tokens), the calibration set. GPTQ fits each layer to these
    statistics; with fewer it fits them too closely (on other held-out sentences the minimum cosine
    of int4 g64, plain GPTQ over every padded position, went 0.963, 0.967, 0.973 for 128, 256, 512
    sentences)."""
    return sentences(512, seed=1)


@pytest.fixture(scope="module")
def held_out(calibration_texts):
    texts, batches = minilm_model.held_out_batches(256, batch_size=32, exclude=calibration_texts)
    assert len(texts) == 256 and not set(texts) & set(calibration_texts)
    return batches


@pytest.fixture(scope="module")
def reference_embeddings(minilm, held_out):
    return minilm_model.sentence_embeddings(minilm, held_out)


# the pipelines that read no calibration data: compiled without it, their report's fidelity is measured
# on the example inputs instead of 32 batches (half a minute each); the tests measure on held-out sentences
UNCALIBRATED = {"int8_weight", "int4_rtn"}
# SmoothQuant reads only each layer's input range and its error on the batches: 8 batches (128 sentences)
# keep W8A8 near 0.998 (min cosine 0.99819 with 8, 0.99840 with 32), at a quarter of the compile's runs
FEW_BATCHES = {"int8_dynamic", "int8_dynamic_7bit"}


@pytest.fixture(scope="module")
def quantized(minilm, minilm_inputs, calibration_texts):
    """Each pipeline compiled once, lazily."""
    calibration = [minilm_model.encode(calibration_texts[i:i + 16]) for i in range(0, len(calibration_texts), 16)]
    cache = {}

    def get(name):
        if name not in cache:
            batches = None if name in UNCALIBRATED else calibration[:8] if name in FEW_BATCHES else calibration
            cache[name] = bevel.compile(minilm, PIPELINES[name], example_inputs=minilm_inputs, calibration=batches)
        return cache[name]

    return get


def min_cosine(compiled, held_out, reference_embeddings) -> float:
    embeddings = minilm_model.sentence_embeddings(compiled, held_out)
    return float(torch.nn.functional.cosine_similarity(embeddings, reference_embeddings).min())


def test_int8_weight_keeps_the_embeddings(quantized, held_out, reference_embeddings):
    cosine = min_cosine(quantized("int8_weight"), held_out, reference_embeddings)
    print(f"int8_weight: min cosine {cosine:.5f} over 256 held-out sentences")
    assert cosine >= 0.998


def test_int8_dynamic_with_smoothing_keeps_the_embeddings(quantized, held_out, reference_embeddings):
    compiled = quantized("int8_dynamic")
    cosine = min_cosine(compiled, held_out, reference_embeddings)
    print(f"int8_dynamic(smooth=0.5): min cosine {cosine:.5f}; smoothed layers: "
          f"{len(compiled.report.passes[0].stats['smoothed'])}")
    assert cosine >= 0.99
    assert compiled.report.passes[0].stats["smoothed"], "smoothing was kept for no layer"


def test_int8_dynamic_with_7_bit_codes_keeps_the_embeddings(quantized, held_out, reference_embeddings):
    """The narrower codes (for CPUs without VNNI) hold the same bar as the 8-bit ones; both printed."""
    eight = min_cosine(quantized("int8_dynamic"), held_out, reference_embeddings)
    seven = min_cosine(quantized("int8_dynamic_7bit"), held_out, reference_embeddings)
    print(f"int8_dynamic(smooth=0.5): min cosine {eight:.5f} with 8-bit activation codes, {seven:.5f} with 7-bit")
    assert 0.99 <= seven < eight


@pytest.fixture(scope="module")
def rtn_min_cosine(quantized, held_out, reference_embeddings) -> float:
    """Round-to-nearest int4 (groups of 64, int8 tables): the baseline GPTQ must beat."""
    return min_cosine(quantized("int4_rtn"), held_out, reference_embeddings)


def test_int4_gptq_keeps_the_embeddings_and_beats_round_to_nearest(quantized, held_out, reference_embeddings,
                                                                  rtn_min_cosine):
    """The target is a minimum cosine of 0.97 with groups of 64, in the configuration that also meets the
    20% file size below. Mean cosines are printed too: the minimum is one short sentence, where
    quantization noise averages over few tokens."""
    embeddings = minilm_model.sentence_embeddings(quantized("int4_gptq"), held_out)
    cosines = torch.nn.functional.cosine_similarity(embeddings, reference_embeddings)
    print(f"{PIPELINES['int4_gptq']}: min cosine {float(cosines.min()):.5f} (mean {float(cosines.mean()):.5f}); "
          f"round-to-nearest with int8 tables {rtn_min_cosine:.5f}")
    assert float(cosines.min()) > rtn_min_cosine
    assert float(cosines.min()) >= 0.97


def file_size(path: str) -> int:
    """Bytes of an ONNX model with its external data file, if any."""
    return os.path.getsize(path) + (os.path.getsize(path + ".data") if os.path.exists(path + ".data") else 0)


@pytest.fixture(scope="module")
def fp32_onnx_size(minilm, minilm_inputs, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fp32") / "model.onnx")
    bevel.compile(minilm, "cleanup", example_inputs=minilm_inputs).export_onnx(path)
    return file_size(path)


@pytest.mark.parametrize("name, size_limit", [("int8_weight", 0.30), ("int8_dynamic", 0.30),
                                              ("int4_gptq", 0.20)])
def test_onnx_export_runs_in_onnxruntime_agrees_and_is_small(quantized, name, size_limit, fp32_onnx_size,
                                                             held_out, tmp_path):
    compiled = quantized(name)
    path = compiled.export_onnx(str(tmp_path / f"{name}.onnx"))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    cosines = []
    for ids, mask in held_out[:2]:
        onnx_hidden = session.run(None, dict(zip(names, (ids.numpy(), mask.numpy()))))[0]
        pooled_onnx = minilm_model.mean_pooled((torch.from_numpy(np.asarray(onnx_hidden)),), mask)
        pooled = minilm_model.mean_pooled(compiled(ids, mask), mask)
        cosines.append(torch.nn.functional.cosine_similarity(pooled_onnx, pooled))
    cosine = float(torch.cat(cosines).min())
    ratio = file_size(path) / fp32_onnx_size
    print(f"{name}: onnxruntime vs CompiledModule min cosine {cosine:.6f}; file {ratio:.1%} of the fp32 export")
    assert cosine >= 0.999
    assert ratio <= size_limit


FRESH_PROCESS = """
import sys, torch, bevel
compiled = bevel.load(sys.argv[1])
inputs = torch.load(sys.argv[2])
outputs = compiled(*inputs)
torch.save(list(outputs.values()), sys.argv[3])
"""


@pytest.mark.parametrize("name", ["int8_dynamic", "int4_gptq"])
def test_a_saved_quantized_artifact_gives_the_same_outputs_in_a_fresh_process(quantized, name, fresh_sentences,
                                                                              tmp_path):
    compiled = quantized(name)
    artifact = compiled.save(str(tmp_path / "artifact"))
    script = tmp_path / "run.py"
    script.write_text(FRESH_PROCESS)
    torch.save(tuple(fresh_sentences), tmp_path / "inputs.pt")
    run = subprocess.run([sys.executable, str(script), artifact, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    expected = list(compiled(*fresh_sentences).values())  # last_hidden_state, pooler_output
    got = torch.load(tmp_path / "out.pt")
    assert len(got) == len(expected) == 2
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
