"""tome.pitome: the plan against a plain-Python statement of PiToMe's rule, outputs unchanged when
nothing real is merged, and the rewrite of a timm ViT, an HF BERT and the real MiniLM.

The planner only calls its inserter, so the plan is checked by running each op at once on small
tensors (the same code the graph holds). Merging changes outputs by design: the fidelity bounds on
random-weight models are loose sanity bounds, the MiniLM floor a measured regression guard.
"""

from __future__ import annotations

import math

import pytest
import torch

from bevel.models.minilm import mean_pooled, sentence_embeddings
from bevel.passes.tome.pitome import pitome_planner
from bevel.passes.tome.token_prune import prune_planner
from tests.passes.token_reduction import (EagerInserter, apply_pass, block_of, min_cosine, onnx_round_trip,
                                         padded_ids)

SIZES = [[1.0] * 12, [1.0] * 8 + [0.0] * 4, [1.0] * 4 + [0.0] * 8, [2.0, 1.0, 3.0] + [1.0] * 7 + [0.0] * 2]


def pitome_reference(metric, size, r, protect, margin, alpha):
    """The rule in plain Python: energies over the real tokens, the 2k most energetic unprotected real
    tokens alternate into A and B, each A finds its most similar B; padding goes first (later first),
    then the A tokens with the best matches; a merged A takes its B's slot."""
    dests = []
    for x, sizes in zip(metric.tolist(), size.tolist()):
        count = len(sizes)
        norms = [math.sqrt(sum(v * v for v in row)) for row in x]
        cos = [[sum(a * b for a, b in zip(x[i], x[j])) / (norms[i] * norms[j]) for j in range(count)]
               for i in range(count)]
        real = [j for j in range(count) if sizes[j] > 0]
        energy = {i: sum(c if c >= margin else alpha * (math.exp(c - margin) - 1) for c in (cos[i][j] for j in real))
                  / len(real) for i in real}
        remove = min(r, max(count - protect, 0) // 2, max(count - 2, 0))
        order = sorted((i for i in real if i >= protect), key=lambda i: -energy[i])[:2 * remove]
        side_a, side_b = order[0::2], order[1::2]
        match = {a: max(side_b, key=lambda b: cos[a][b]) for a in side_a if side_b}
        padding = [i for i in reversed(range(protect, count)) if sizes[i] == 0]
        merged = sorted(match, key=lambda a: -cos[a][match[a]])
        removed = set((padding + merged)[:remove])
        slots, slot = [], -1
        for i in range(count):
            slot += i not in removed
            slots.append(max(slot, 0))
        dests.append([slots[match[i]] if i in removed and sizes[i] > 0 else slots[i] for i in range(count)])
    return torch.tensor(dests)


@pytest.mark.parametrize("r, protect, margin, alpha", [(2, 1, 0.5, 1.0), (3, 0, 0.2, 1.0), (4, 2, 0.0, 0.5),
                                                      (20, 1, 0.5, 1.0)])
def test_plan_merges_the_most_energetic_tokens(r, protect, margin, alpha):
    generator = torch.Generator().manual_seed(r * 10 + protect)
    centers = torch.randn(3, 6, generator=generator)  # clusters, so that energies differ
    metric = centers[torch.randint(0, 3, (4, 12), generator=generator)] + 0.5 * torch.randn(4, 12, 6,
                                                                                             generator=generator)
    size = torch.tensor(SIZES)
    dest = pitome_planner(protect, margin, alpha)(EagerInserter(), None, metric, size, r)
    assert dest.tolist() == pitome_reference(metric, size, r, protect, margin, alpha).tolist()


@pytest.mark.filterwarnings("ignore:# The axis name")
def test_plans_export_to_onnx_with_dynamic_shapes(tmp_path):
    """Both plans (this one and token_prune's) are plain aten: ONNX Runtime runs them at another size."""
    class Plans(torch.nn.Module):
        def forward(self, query, keys, size):
            dest, weight = prune_planner(1, "mean")(EagerInserter(), block_of(query, keys), None, size, 3)
            return dest, weight, pitome_planner(1, 0.5, 1.0)(EagerInserter(), None, keys.mean(1), size, 3)

    batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens")
    shapes = ({0: batch, 2: tokens}, {0: batch, 2: tokens}, {0: batch, 1: tokens})
    example = (*torch.randn(2, 2, 3, 10, 4), torch.ones(2, 10))
    query, keys = torch.randn(2, 3, 3, 13, 4, generator=torch.Generator().manual_seed(5))
    size = torch.ones(3, 13)
    size[1, 9:] = 0
    got = onnx_round_trip(Plans(), example, shapes, (query, keys, size), tmp_path / "plans.onnx")
    assert [g.tolist() for g in got] == [w.tolist() for w in Plans()(query, keys, size)]


# --- models ------------------------------------------------------------------------------------------

def test_r_zero_leaves_the_graph_alone(bert_captured):
    _, result = apply_pass(bert_captured, "tome.pitome", r=0)
    assert not result.changed and result.stats["r"] == [0, 0]


def test_bert_padding_only_exact_and_other_batch_size_and_length(bert_captured):
    model = bert_captured.model
    graph, result = apply_pass(bert_captured, "tome.pitome", r=2, drop_padding=False)
    assert result.stats["tokens"] == [12, 10, 8]
    # 5+ padding per row: the two blocks of r=2 remove only padding, so the real outputs are unchanged
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
    print(f"BERT random weights, tome.pitome r=2: min cosine of mean-pooled states {cosine:.4f}")
    # random weights (std 0.02) attend almost uniformly and the states stay close to their embeddings;
    # a merged position reads the average it went into, which moves the pooled mean a little
    assert cosine > 0.9


def test_vit_runs_on_another_batch_size(vit_captured):
    graph, result = apply_pass(vit_captured, "tome.pitome", r=8)
    assert result.stats["tokens"] == [197, 189, 181, 173, 165]
    images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want, got = vit_captured.model(images), graph(images)
    assert got.shape == want.shape == (3, 10)
    cosine = min_cosine(got, want)
    print(f"ViT-Tiny (4 blocks) random weights, tome.pitome r=8: min cosine of logits {cosine:.4f}")
    # random weights attend almost uniformly and the head reads the protected CLS token: merging 32
    # of 196 patch tokens into similar ones moves the logits little
    assert cosine > 0.99


def test_minilm_real_sentences(minilm_captured, minilm_held_out):
    batches, want = minilm_held_out
    graph, _ = apply_pass(minilm_captured, "tome.pitome", r=2)
    cosine = min_cosine(sentence_embeddings(graph, batches), want)
    print(f"MiniLM tome.pitome r=2: min cosine of sentence embeddings {cosine:.4f}")
    assert cosine > 0.98  # regression guard: measured 0.9885 on these 64 held-out sentences
