"""End to end on real all-MiniLM-L6-v2 weights: compile with cleanup | prune.magnitude(sparsity=0.3)."""

from __future__ import annotations

import pytest
import torch

from bevel.models.minilm import load_minilm


def test_report_shows_thirty_percent_of_linear_weights_zero(minilm_pruned):
    report = minilm_pruned.report
    assert [p.status for p in report.passes] == ["applied", "applied"]
    prune = report["prune.magnitude"]
    assert prune.after.sparsity == pytest.approx(0.30, abs=0.01)
    assert prune.stats["sparsity"] == pytest.approx(0.30, abs=0.01)
    assert "30.0%" in str(report)  # the zeros column of the table
    # the figure is true of the compiled weights themselves
    weights = [m for n, m in minilm_pruned.graph_module.named_parameters()
               if n.endswith(".weight") and m.dim() == 2 and "embeddings" not in n]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.30, abs=0.01)


def test_fidelity_figures_are_present_and_sane(minilm_pruned):
    cleanup, prune = minilm_pruned.report.passes
    assert cleanup.fidelity.cosine == pytest.approx(1.0, abs=1e-6)
    assert cleanup.fidelity.max_abs_error <= 1e-5
    assert 0.0 < prune.fidelity.cosine < 1.0 and prune.fidelity.max_abs_error > 0
    data = minilm_pruned.report.to_json()
    assert data["passes"][1]["fidelity"]["cosine"] == prune.fidelity.cosine
    assert data["original"]["flops"] > 0 and data["original"]["params"] == 22_713_216 + 1024


def test_users_model_is_unchanged_bit_for_bit(minilm, minilm_pruned):
    # minilm_pruned was compiled from the session-scoped `minilm` fixture: it must still equal the weights on disk
    pristine = load_minilm().state_dict()
    current = minilm.state_dict()
    assert current.keys() == pristine.keys()
    for name, value in pristine.items():
        assert torch.equal(current[name], value), name


def test_compiled_minilm_runs_other_batch_sizes_and_lengths(minilm, minilm_pruned, fresh_sentences):
    out = minilm_pruned(*fresh_sentences)
    assert out.last_hidden_state.shape == (7, fresh_sentences[0].shape[1], 384)
    single = tuple(t[:1] for t in fresh_sentences)
    assert minilm_pruned(*single).pooler_output.shape == (1, 384)
