"""The early-exit ops (references against hand-written cases, fakes through ``opcheck``, ONNX in
onnxruntime) and the block-by-block runtime after saving and loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bevel
from bevel.ir.decoder import prefill_inputs
from bevel.runtime.early_exit_ops import early_exit_decide, early_exit_freeze, exit_confidence
from tests.decoders import padded_prompts, small_causal_lm
from tests.passes.test_layer_skip_early_exit import _threshold_among, reference_early_exit


def _logits_with_top(probabilities: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is exactly ``probabilities`` (rows of a [1, T, V] batch)."""
    return torch.tensor(probabilities).log()[None]


def test_confidence_criteria():
    logits = _logits_with_top([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]])
    assert torch.allclose(exit_confidence(logits, "max_prob"), torch.tensor([[0.7, 0.4]]))
    assert torch.allclose(exit_confidence(logits, "margin"), torch.tensor([[0.5, 0.05]]))


def test_decide_gives_confident_tokens_this_depth_and_keeps_earlier_exits():
    logits = _logits_with_top([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.9, 0.05, 0.05], [0.6, 0.3, 0.1]])
    depth = torch.tensor([[12, 12, 2, 12]])  # the third token left after block 1
    got = early_exit_decide(logits, depth, 0.5, 5, "max_prob", False)
    assert got.tolist() == [[5, 12, 2, 5]]
    assert early_exit_decide(logits, depth, 1.0, 5, "max_prob", False).tolist() == depth.tolist()


def test_shared_decisions_need_every_row_and_never_rise_along_the_sequence():
    confident, unsure = [0.9, 0.05, 0.05], [0.4, 0.35, 0.25]
    logits = torch.cat([_logits_with_top([unsure, confident, unsure, confident]),
                        _logits_with_top([confident, confident, unsure, unsure])])
    depth = torch.full((2, 4), 12)
    got = early_exit_decide(logits, depth, 0.5, 3, "max_prob", True)
    # position 1 is confident in both rows; position 2 is in neither, but follows position 1
    assert got.tolist() == [[12, 3, 3, 3], [12, 3, 3, 3]]


def test_freeze_keeps_the_input_of_exited_tokens():
    hidden_in, hidden_out = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    depth = torch.tensor([[2, 5, 3], [5, 5, 1]])
    got = early_exit_freeze(hidden_in, hidden_out, depth, 3)
    assert got[..., 0].tolist() == [[0, 1, 0], [1, 1, 0]]
    per_sample = early_exit_freeze(hidden_in, hidden_out, torch.tensor([1, 4]), 2)
    assert per_sample[:, 0, 0].tolist() == [0, 1]


def test_fakes_and_schemas_agree_with_the_references():
    logits, depth = torch.randn(2, 5, 7), torch.full((2, 5), 4)
    for shared in (False, True):
        torch.library.opcheck(torch.ops.bevel.early_exit_decide.default, (logits, depth, 0.3, 2, "margin", shared))
    torch.library.opcheck(torch.ops.bevel.early_exit_freeze.default,
                          (torch.randn(2, 5, 3), torch.randn(2, 5, 3), torch.tensor([[1, 4, 2, 4, 4]] * 2), 2))


@pytest.fixture(scope="module")
def sharp_llama():
    model = small_causal_lm("llama", layers=4, seed=4)
    with torch.no_grad():  # confidences spread over (0, 1), as in tests/passes/test_layer_skip_early_exit.py
        model.lm_head.weight.mul_(40)
    return model


@pytest.mark.parametrize("mode", ["token", "skipdecode"])
def test_onnx_export_exits_like_the_graph(sharp_llama, mode, tmp_path):
    import onnxruntime

    ids, mask = padded_prompts([7, 10, 4], seed=13)
    _, _, confidences = reference_early_exit(sharp_llama, ids, mask, 1.0, 1)
    threshold = _threshold_among(confidences[:, mask.bool()])
    cm = bevel.compile(sharp_llama, f"layer_skip.early_exit(threshold={threshold!r}, min_layer=1, mode=\"{mode}\")",
                       example_inputs=padded_prompts([6, 4], seed=1))
    path = cm.export_onnx(str(tmp_path / "early_exit.onnx"))
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    inputs = prefill_inputs(cm.spec, ids, mask)  # another batch size and length than compiled with
    got = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)})
    expected = cm.step(*inputs)
    assert np.abs(got[0] - expected["logits"].numpy())[mask.bool().numpy()].max() < 1e-4
    assert np.abs(got[1] - expected["present_key_0"].numpy()).max() < 1e-4


def test_a_loaded_artifact_runs_block_by_block_and_generates_the_same(sharp_llama, tmp_path):
    ids, mask = padded_prompts([7, 10, 4], seed=13)
    _, _, confidences = reference_early_exit(sharp_llama, ids, mask, 1.0, 1)
    threshold = _threshold_among(confidences[:, mask.bool()])
    cm = bevel.compile(sharp_llama, f"layer_skip.early_exit(threshold={threshold!r}, min_layer=1)",
                       example_inputs=padded_prompts([6, 4], seed=1))
    expected = cm.generate(ids, 8, attention_mask=mask, eos_token_id=None)
    cm.save(str(tmp_path / "art"))
    loaded = bevel.load(str(tmp_path / "art"))
    # the saved program is traced again; its runtime still splits into blocks rather than running whole
    assert not loaded.decode_graph.whole and not loaded.prefill_graph.whole
    assert torch.equal(loaded.generate(ids, 8, attention_mask=mask, eos_token_id=None), expected)
    assert loaded.early_exit.depth_counts() == cm.early_exit.depth_counts()
