"""``layer_skip.static`` on the real all-MiniLM-L6-v2: the report gives every layer's redundancy
and the fidelity of removing it alone, and the layer removed is the one ranked most redundant."""

from __future__ import annotations

import bevel
from bevel.models import minilm as minilm_data


def test_minilm_report_scores_every_layer_and_removes_the_most_redundant(minilm, minilm_inputs, minilm_calibration):
    cm = bevel.compile(minilm, "cleanup | layer_skip.static(n=1)", example_inputs=minilm_inputs,
                       calibration=minilm_calibration)
    entry = cm.report["layer_skip.static"]
    print("\n" + "\n".join(entry.notes))
    per_block = entry.stats["per_block"]
    assert sorted(per_block) == list(range(6))
    assert all({"cosine", "rel_l2", "rank", "cosine_without_it"} <= set(f) for f in per_block.values())
    assert entry.status == "applied" and entry.stats["removed"] == [entry.stats["ranking"][0]]
    assert sum("outputs' cosine without it" in note for note in entry.notes) == 6
    assert "removed" in str(cm.report)
    # the held-out embeddings of the skipped model, against the probe's figure on calibration batches
    texts, batches = minilm_data.held_out_batches(count=64, exclude=[])
    reference = minilm_data.sentence_embeddings(minilm, batches)
    skipped = minilm_data.sentence_embeddings(cm, batches)
    cosine = float(__import__("torch").nn.functional.cosine_similarity(reference, skipped).min())
    removed = entry.stats["removed"][0]
    print(f"removed layer {removed}: held-out min cosine {cosine:.4f}, calibration probe "
          f"{per_block[removed]['cosine_without_it']:.4f}")
    # measured: layer 2, held-out 0.801, probe 0.843 (the best of the six probes; layer 0 alone gives 0.53)
    assert cosine > 0.75
    probes = sorted(f["cosine_without_it"] for f in per_block.values())
    assert per_block[removed]["cosine_without_it"] >= probes[3]  # the ranking picks a layer of the harmless half
