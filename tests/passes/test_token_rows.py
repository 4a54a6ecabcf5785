"""Calibration rows: padding never counts, and every example weighs the same in a layer's Hessian.

The model-level check is exact by construction: in a BERT encoder a padded position never changes
a real token's activations (the attention mask removes it), so the statistics of a padded batch of
two sentences must equal the sums of the statistics of each sentence run alone, unpadded, to
float32 rounding (1e-5 relative).
"""

from __future__ import annotations

import torch

from bevel.ir.analysis import LINEAR_OPS
from bevel.ir.capture import capture
from bevel.passes.quantize.calibration import collect_input_stats
from bevel.passes.token_rows import example_rows, token_mask
from tests.models_zoo import seeded


def test_padded_rows_are_dropped_and_each_sequence_sums_to_one():
    x = torch.randn(2, 4, 3, generator=seeded(0))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]).bool()
    rows, weights = example_rows(x, mask)
    torch.testing.assert_close(rows, torch.cat([x[0], x[1, :2]]))
    torch.testing.assert_close(weights, torch.tensor([0.25] * 4 + [0.5] * 2))


def test_flattened_tokens_and_extra_dimensions_are_read_against_the_mask():
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]]).bool()
    flat = torch.randn(6, 5, generator=seeded(1))  # [batch * tokens, K], as GPT-2's Conv1D sees it
    rows, weights = example_rows(flat, mask)
    torch.testing.assert_close(rows, flat[[0, 3, 4, 5]])
    torch.testing.assert_close(weights, torch.tensor([1.0, 1 / 3, 1 / 3, 1 / 3]))
    heads = torch.randn(2, 3, 2, 5, generator=seeded(2))  # [batch, tokens, heads, K]
    rows, weights = example_rows(heads, mask)
    assert rows.shape == (8, 5)
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.5] + [1 / 6] * 6))


def test_without_a_mask_every_row_is_kept_and_each_example_still_sums_to_one():
    rows, weights = example_rows(torch.randn(3, 7, 4), None)
    assert rows.shape == (21, 4)
    torch.testing.assert_close(weights, torch.full((21,), 1 / 7))
    rows, weights = example_rows(torch.randn(5, 4), None)
    assert rows.shape == (5, 4) and bool((weights == 1).all())


def test_the_token_mask_is_the_attention_mask_or_every_token_of_plain_ids():
    ids, mask = torch.randint(0, 9, (2, 4)), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert torch.equal(token_mask((ids, mask)), mask.bool())
    assert bool(token_mask((ids,)).all()) and token_mask((ids,)).shape == (2, 4)
    assert token_mask((torch.randn(2, 3, 8, 8),)) is None
    assert token_mask((torch.randn(2, 16),)) is None  # float rows are features, not tokens


def test_a_padded_batch_gives_the_statistics_of_its_sentences_run_alone():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=16)).eval()
    ids = torch.randint(1, 50, (2, 6), generator=seeded(3))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    ids[1, 2:] = 0
    graph = capture(model, (ids, mask))
    linears = {n: n.args[0] for n in graph.fx_graph.nodes if n.target in LINEAR_OPS}
    padded = collect_input_stats(graph, linears, [(ids, mask)], with_hessian=True)
    alone = collect_input_stats(graph, linears, [(ids[:1], mask[:1]), (ids[1:, :2], mask[1:, :2])], with_hessian=True)
    for node, x in linears.items():
        per_token = len(graph.shape(x)) == 3  # the pooler reads one row per sentence
        assert padded[node].rows == alone[node].rows == (8 if per_token else 2)
        torch.testing.assert_close(padded[node].hessian, alone[node].hessian, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(padded[node].absmax, alone[node].absmax, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(padded[node].squares, alone[node].squares, rtol=1e-5, atol=1e-5)
    # and the Hessian is each sentence's mean x x^T, summed: the query layer's input seen by a hook
    seen = []
    query_layer = model.encoder.layer[0].attention.self.query
    hook = query_layer.register_forward_hook(lambda module, args, out: seen.append(args[0][0]))
    with torch.no_grad():
        model(ids[:1], mask[:1]), model(ids[1:, :2], mask[1:, :2])
    hook.remove()
    expected = sum(x.T @ x / x.shape[0] for x in seen)
    query = next(iter(linears))
    torch.testing.assert_close(padded[query].hessian, expected, rtol=1e-5, atol=1e-5)
