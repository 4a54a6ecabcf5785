"""token_prune: the plan against a plain-Python statement of the rule, outputs unchanged when nothing
real is dropped, and the rewrite of a timm ViT, an HF BERT and the real MiniLM.

The planner only calls its inserter, so the plan is checked by running each op at once on small
tensors (the same code the graph holds). Dropping tokens changes outputs by design: the fidelity
bounds on random-weight models are loose sanity bounds, the MiniLM floor a measured regression guard.
"""

from __future__ import annotations

import math

import pytest
import torch

from bevel.models.minilm import mean_pooled, sentence_embeddings
from bevel.passes.tome.token_prune import attention_received, prune_planner
from bevel.runtime.ops.token_merge import merge_tokens_reference
from tests.passes.token_reduction import EagerInserter, apply_pass, block_of, min_cosine, padded_ids

SIZES = [[1.0] * 10, [1.0] * 7 + [0.0] * 3, [1.0] * 3 + [0.0] * 7]


def received_reference(query, keys, size, importance, scale=None):
    """Attention each token receives, head by head: from the first query, or the mean over real queries."""
    batch, heads, count, dim = query.shape
    scale = 1 / math.sqrt(dim) if scale is None else scale
    out = torch.zeros(batch, count)
    for b in range(batch):
        queries = [0] if importance == "cls" else [i for i in range(count) if size[b, i] > 0]
        for h in range(heads):
            for i in queries:
                logits = (keys[b, h] @ query[b, h, i]) * scale
                out[b] += torch.softmax(logits.masked_fill(size[b] == 0, -math.inf), 0) / (heads * len(queries))
    return out


def prune_reference(received, size, r, protect):
    """The rule in plain Python: drop min(r, unprotected // 2) tokens, padding first (later first), then
    the least attended; each dropped token goes to the slot of the kept token before it, weight 0."""
    dests, weights = [], []
    for score, sizes in zip(received.tolist(), size.tolist()):
        count = len(sizes)
        remove = min(r, max(count - protect, 0) // 2, max(count - 2, 0))
        padding = [i for i in reversed(range(protect, count)) if sizes[i] == 0]
        real = sorted((i for i in range(protect, count) if sizes[i] > 0), key=lambda i: score[i])
        removed = set((padding + real)[:remove])
        slot, dest = -1, []
        for i in range(count):
            slot += i not in removed
            dest.append(max(slot, 0))
        dests.append(dest)
        weights.append([0.0 if i in removed else sizes[i] for i in range(count)])
    return torch.tensor(dests), torch.tensor(weights)


@pytest.mark.parametrize("importance", ["cls", "mean"])
@pytest.mark.parametrize("r, protect", [(2, 1), (3, 0), (3, 2), (10, 1)])
def test_plan_drops_padding_then_the_least_attended(importance, r, protect):
    generator = torch.Generator().manual_seed(r * 10 + protect)
    query, keys = torch.randn(2, 3, 2, 10, 4, generator=generator)
    size = torch.tensor(SIZES)
    received = attention_received(EagerInserter(), block_of(query, keys), size, importance)
    torch.testing.assert_close(received, received_reference(query, keys, size, importance), atol=1e-6, rtol=1e-5)
    dest, weight = prune_planner(protect, importance)(EagerInserter(), block_of(query, keys), None, size, r)
    want_dest, want_weight = prune_reference(received, size, r, protect)
    assert dest.tolist() == want_dest.tolist()
    assert weight.tolist() == want_weight.tolist()
    # the merge only gathers the kept tokens, unchanged
    x = torch.randn(3, 10, 5, generator=generator)
    kept = weight > 0
    merged, sizes = merge_tokens_reference(x, weight, dest, r, protect)
    for b in range(3):
        real = int(kept[b].sum())
        torch.testing.assert_close(merged[b, :real], x[b][kept[b]])
        assert sizes[b, :real].tolist() == [1.0] * real


def test_scale_argument_is_used():
    query, keys = torch.randn(2, 1, 2, 6, 4, generator=torch.Generator().manual_seed(3))
    size = torch.ones(1, 6)
    got = attention_received(EagerInserter(), block_of(query, keys, scale=0.3), size, "cls")
    torch.testing.assert_close(got, received_reference(query, keys, size, "cls", scale=0.3))


# --- models ------------------------------------------------------------------------------------------

def test_r_zero_leaves_the_graph_alone(bert_captured):
    _, result = apply_pass(bert_captured, "token_prune", r=0)
    assert not result.changed and result.stats["r"] == [0, 0]


def test_bert_padding_only_exact_and_other_batch_size_and_length(bert_captured):
    model = bert_captured.model
    graph, result = apply_pass(bert_captured, "token_prune", r=2, drop_padding=False)
    assert result.stats["tokens"] == [12, 10, 8]
    # 5+ padding per row: the two blocks of r=2 drop only padding, so the real outputs are unchanged
    ids, mask = padded_ids(2, 14, [9, 6], seed=2)
    with torch.no_grad():
        want, got = model(ids, mask), graph(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[0][real], want[0][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    ids, mask = padded_ids(5, 17, [17, 10, 3, 12, 16], seed=3)
    with torch.no_grad():
        want, got = model(ids, mask), graph(ids, mask)
    assert got[0].shape == want[0].shape and got[1].shape == want[1].shape
    cosine = min_cosine(mean_pooled(got, mask), mean_pooled(want, mask))
    print(f"BERT random weights, token_prune r=2: min cosine of mean-pooled states {cosine:.4f}")
    # random weights (std 0.02) attend almost uniformly and the states stay close to their embeddings;
    # a dropped position reads the kept token before it, which moves the pooled mean a little
    assert cosine > 0.9


def test_vit_runs_on_another_batch_size(vit_captured):
    graph, result = apply_pass(vit_captured, "token_prune", r=8)
    assert result.stats["tokens"] == [197, 189, 181, 173, 165]
    images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want, got = vit_captured.model(images), graph(images)
    assert got.shape == want.shape == (3, 10)
    cosine = min_cosine(got, want)
    print(f"ViT-Tiny (4 blocks) random weights, token_prune r=8: min cosine of logits {cosine:.4f}")
    # random weights attend almost uniformly and the head reads the protected CLS token: dropping 32
    # of 196 patch tokens moves the logits little (0.9996)
    assert cosine > 0.99


def test_minilm_real_sentences(minilm_captured, minilm_held_out):
    batches, want = minilm_held_out
    graph, _ = apply_pass(minilm_captured, "token_prune", r=2, importance="mean")
    cosine = min_cosine(sentence_embeddings(graph, batches), want)
    print(f"MiniLM token_prune r=2 (importance mean): min cosine of sentence embeddings {cosine:.4f}")
    assert cosine > 0.97  # regression guard: measured 0.982 on these 64 held-out sentences
