"""``tome(pack=true)``: token merging within the sequences of a packed batch, on a random HF BERT
and on MiniLM with real weights.

Two differentials are exact in real arithmetic, so they are checked at 1e-5 (float32 roundings of
sums of a few hundred terms, on values of order 1):
- when every row holds one sequence and no padding, packing changes nothing and the merges are
  ToMe's: the packed model equals ``tome`` without packing;
- sequences sharing a row whose removals are all padding keep their outputs: their attention is
  masked to their own sequence before and after the padding merges into them at weight 0.
On MiniLM the merges change the embeddings; the check is the issue's fidelity floor (cosine 0.97).
"""

from __future__ import annotations

import pytest
import torch

import bevel
from bevel.errors import ExportError
from bevel.ir import capture
from bevel.models import minilm
from tests.passes.token_reduction import apply_pass, assert_loads_identical, padded_ids, small_bert, small_vit


def test_rows_of_one_full_sequence_merge_as_tome_without_packing():
    bert = small_bert()
    packed, result = apply_pass(bert, "tome", r=3, pack=True)
    plain, _ = apply_pass(bert, "tome", r=3)
    assert result.changed and result.stats["tokens"] == [12, 12, 9, 6]
    for batch, length in ((3, 12), (4, 9), (1, 16)):
        ids, mask = padded_ids(batch, length, [length] * batch, seed=batch)
        with torch.no_grad():
            got, want = packed(ids, mask), plain(ids, mask)
        for output in range(2):  # last_hidden_state, pooler_output
            assert got[output].shape == want[output].shape
            torch.testing.assert_close(got[output], want[output], rtol=0, atol=1e-5)


def test_sequences_sharing_a_row_that_loses_only_padding_keep_their_outputs():
    bert = small_bert()
    graph, result = apply_pass(bert, "tome", r=3, pack=True)
    ids, mask = padded_ids(3, 12, [12, 3, 2], seed=7)  # rows: [12] and [3, 2, 7 padding]
    with torch.no_grad():
        got, want = graph(ids, mask), bert.model(ids, mask)
    for sequence in (1, 2):  # 2 blocks x r=3 = 6 removals from their row, 7 of which are padding
        real = mask[sequence].bool()
        torch.testing.assert_close(got[0][sequence, real], want.last_hidden_state[sequence, real], rtol=0,
                                   atol=1e-5)
        torch.testing.assert_close(got[1][sequence], want.pooler_output[sequence], rtol=0, atol=1e-5)
    assert (got[0][0] - want.last_hidden_state[0]).abs().max() > 1e-3  # the full row did merge real tokens
    assert got[0].shape == want.last_hidden_state.shape
    assert any("packed into" in note and "merged within each sequence" in note for note in result.notes)


def test_r_zero_changes_nothing_and_packing_needs_a_padding_mask():
    _, result = apply_pass(small_bert(), "tome", r=0, pack=True)
    assert not result.changed
    graph, result = apply_pass(small_vit(), "tome", r=4, pack=True)
    assert result.changed and result.stats["tokens"][1] == result.stats["tokens"][0] - 4
    assert any("pack: the attention has no padding mask; merged without packing" in n for n in result.notes)


def test_r_above_half_a_packed_row_is_clamped_and_reported():
    _, result = apply_pass(small_bert(), "tome", r=[8, 2], pack=True)
    assert result.stats["tokens"] == [12, 12, 7, 5]  # (12 - 1) // 2 = 5 removed in the first block
    assert "merge 1: r=8 clamped to 5 (half of the unprotected tokens at the example size)" in result.notes


def test_a_capture_with_static_shapes_merges_without_packing():
    bert = small_bert()
    bert.graph = capture(bert.model, bert.example, dynamic_shapes="static")
    _, result = apply_pass(bert, "tome", r=2, pack=True)
    assert result.changed and "rows" not in result.stats
    assert any("static shapes" in note and "merged without packing" in note for note in result.notes)


def test_onnx_export_is_refused_by_name_and_save_load_keeps_outputs(tmp_path):
    bert = small_bert()
    compiled = bevel.compile(bert.model, "tome(r=2, pack=true)", example_inputs=bert.example)
    path = tmp_path / "packed.onnx"
    with pytest.raises(ExportError, match=r"which has no ONNX form; `tome` put it there"):
        compiled.export_onnx(str(path))
    assert not path.exists()
    assert_loads_identical(compiled, tmp_path)


def test_packed_merging_keeps_minilm_embeddings_on_real_sentences():
    model = minilm.load_minilm()
    pipeline = 'cleanup | tome(r=[0, 0, 0, 8, 8, 8], metric="hidden", pack=true)'
    compiled = bevel.compile(model, pipeline, example_inputs=minilm.example_inputs())
    entry = compiled.report["tome"]
    assert entry.status == "applied" and entry.stats["tokens"][-1] < entry.stats["width"]
    texts, held_out = minilm.held_out_batches(256)  # padded to each batch's longest sentence
    cosine = torch.nn.functional.cosine_similarity(minilm.sentence_embeddings(compiled, held_out),
                                                   minilm.sentence_embeddings(model, held_out))
    print(f"tome(pack) on MiniLM, {len(cosine)} sentences: min cosine {float(cosine.min()):.5f}, "
          f"tokens per row {entry.stats['tokens']}")
    assert float(cosine.min()) >= 0.97
