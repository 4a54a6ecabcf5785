"""unpad (sequence packing): the packing op against a plain-Python packing, the pass on a random HF
BERT and on MiniLM with real weights (exact at every real token), and the cases it leaves alone.

Tolerance: packing changes no arithmetic of a real token, only which padding keys its attention
skips (their weights are exactly 0 either way) and the shapes the kernels block over, so outputs
agree to float32 rounding of sums of a few hundred terms: 1e-5 absolute on values of order 1.
"""

from __future__ import annotations

import pytest
import torch

import bevel
from bevel.errors import ExportError
from bevel.ir import capture
from bevel.models import minilm
from bevel.runtime.ops.sequence_pack import pack_sequences_reference, row_placement

from bevel.passes import PassContext, get_pass
from tests.models_zoo import MLP, MaskedEncoder, padded_tokens, seeded
from tests.passes.token_reduction import apply_pass, assert_loads_identical, padded_ids, small_bert, small_vit


def python_packing(x: torch.Tensor, size: torch.Tensor):
    """The packing written out token by token: every sequence's real tokens in order, placed where
    ``row_placement`` puts them, the rest zeros with segment -1."""
    lengths = [int((row > 0).sum()) for row in size]
    width = max(max(lengths), 1)
    placed = row_placement(lengths, width)
    rows = max(row for row, _ in placed) + 1
    packed = torch.zeros(rows, width, x.shape[-1])
    segment = torch.full((rows, width), -1)
    source = torch.zeros(size.shape, dtype=torch.int64)
    for b, (row, column) in enumerate(placed):
        k = 0
        for i in range(size.shape[1]):
            if size[b, i] > 0:
                packed[row, column + k], segment[row, column + k] = x[b, i], b
                source[b, i] = row * width + column + k
                k += 1
            else:
                source[b, i] = row * width + column
    return packed, segment, source


def test_rows_are_filled_first_fit_by_decreasing_length():
    # the 6 fills row 0; the 3, 2 and 1 share row 1 in that order
    assert row_placement([3, 6, 2, 1], 6) == [(1, 0), (0, 0), (1, 3), (1, 5)]
    assert row_placement([4, 4, 4], 4) == [(0, 0), (1, 0), (2, 0)]


@pytest.mark.parametrize("real", [
    [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]],
    [[0, 0, 1, 1, 1, 1], [1, 0, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0]],  # left padding, holes, an empty row
])
def test_packing_equals_the_python_packing(real):
    size = torch.tensor(real, dtype=torch.float32) * torch.randint(1, 3, (len(real), 6)).float()
    x = torch.randn(len(real), 6, 5, generator=torch.Generator().manual_seed(0))
    got, want = pack_sequences_reference(x, size), python_packing(x, size)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    # unpacking through the source map gives back every real token
    assert torch.equal(got[0].reshape(-1, 5)[got[2]][size > 0], x[size > 0])


def test_unpad_is_exact_on_a_random_bert_with_padding():
    bert = small_bert()
    graph, result = apply_pass(bert, "unpad")
    assert result.changed and result.stats["rows"] == 3  # lengths 12, 8, 5 in rows of 12: no two fit together
    # other batch sizes and lengths, one of them packing several sequences into a row
    for batch, length, real in ((3, 12, [12, 8, 5]), (5, 9, [9, 3, 4, 2, 6]), (1, 7, [5])):
        ids, mask = padded_ids(batch, length, real, seed=batch)
        with torch.no_grad():
            want, got = bert.model(ids, mask), graph(ids, mask)
        keep = mask.bool()
        torch.testing.assert_close(got[0][keep], want.last_hidden_state[keep], rtol=0, atol=1e-5)
        torch.testing.assert_close(got[1], want.pooler_output, rtol=0, atol=1e-5)
        assert got[0].shape == want.last_hidden_state.shape


def test_unpad_is_exact_on_an_encoder_whose_first_block_reads_the_input():
    # packing starts at the model's input itself, which torch.export's input guards also read
    torch.manual_seed(0)
    model = MaskedEncoder().eval()
    example = padded_tokens(seeded(0), 3, 12)
    compiled = bevel.compile(model, "cleanup | unpad", example_inputs=example)
    assert compiled.report["unpad"].status == "applied", compiled.report["unpad"].reason
    x, mask = padded_tokens(seeded(1), 5, 10)
    mask[2:, 3:] = 0  # three short rows that share packed rows
    with torch.no_grad():
        want, got = model(x, mask), compiled(x, mask)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=0, atol=1e-5)


def test_unpad_keeps_minilm_embeddings_on_real_sentences():
    model = minilm.load_minilm()
    compiled = bevel.compile(model, "cleanup | unpad", example_inputs=minilm.example_inputs())
    texts, held_out = minilm.held_out_batches(256)  # padded to each batch's longest sentence
    padded = held_out + [minilm.encode(texts[i:i + 32], pad_to_max=True) for i in (0, 32)]  # and to 128
    cosine = torch.nn.functional.cosine_similarity(minilm.sentence_embeddings(compiled, padded),
                                                   minilm.sentence_embeddings(model, padded))
    print(f"unpad on MiniLM, {len(cosine)} sentences: min cosine {float(cosine.min()):.7f}")
    assert float(cosine.min()) > 0.99999
    assert compiled.report["unpad"].status == "applied"  # the model was packed, not left as it was


def test_a_model_without_padding_mask_or_attention_is_left_unchanged():
    _, result = apply_pass(small_vit(), "unpad")
    assert not result.changed and any("no padding mask" in note for note in result.notes)
    example = (torch.randn(2, 16),)
    context = PassContext(calibration=[example], example_inputs=example)
    result = get_pass("unpad")().run(capture(MLP().eval(), example), context)
    assert not result.changed and any("no transformer block" in note for note in result.notes)


def test_a_capture_with_static_shapes_is_left_unchanged():
    bert = small_bert()
    bert.graph = capture(bert.model, bert.example, dynamic_shapes="static")
    _, result = apply_pass(bert, "unpad")
    assert not result.changed and any("static shapes" in note for note in result.notes)


def test_onnx_export_of_a_packed_model_is_refused_by_name(tmp_path):
    bert = small_bert()
    compiled = bevel.compile(bert.model, "unpad", example_inputs=bert.example)
    path = tmp_path / "packed.onnx"
    with pytest.raises(ExportError, match="pack_sequences, which has no ONNX form; `unpad` put it there: compile "
                                          "without it"):
        compiled.export_onnx(str(path))
    assert not path.exists()


def test_a_packed_model_saves_and_loads(tmp_path):
    bert = small_bert()
    compiled = bevel.compile(bert.model, "unpad", example_inputs=bert.example)
    assert_loads_identical(compiled, tmp_path)


def test_the_fidelity_check_compares_real_positions_so_a_budget_keeps_the_pass():
    bert = small_bert()
    batches = [padded_ids(5, 9, [9, 3, 4, 2, 6], seed=2), bert.example]
    compiled = bevel.compile(bert.model, "unpad", example_inputs=bert.example, calibration=batches,
                             max_fidelity_drop=1e-5)
    entry = compiled.report["unpad"]
    assert entry.status == "applied", entry.reason
    assert entry.fidelity.cosine > 1 - 1e-6 and entry.fidelity.max_abs_error < 1e-5
