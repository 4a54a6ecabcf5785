"""``layer_skip.static`` on the trained tinylm, judged by held-out perplexity: the ranking must
predict the damage (dropping the two layers ranked most redundant costs less than dropping the two
ranked least), and the fitted affine compensation must recover part of the loss."""

from __future__ import annotations

import pytest

import bevel
from bevel.eval import perplexity
from bevel.models import tinylm

HELD_OUT_BYTES = 8192  # a slice of the held-out split, scored with 512 bytes of context


@pytest.fixture(scope="module")
def setup(tinylm_model):
    model = tinylm_model
    text = tinylm.held_out_text()[:HELD_OUT_BYTES]
    calibration = tinylm.text_windows(count=4, batch_size=4, length=256)
    return model, text, calibration


def _compiled_perplexity(captured, text, calibration, pipeline):
    cm = bevel.compile(captured, pipeline, calibration=calibration, max_cache_len=1024)
    return cm, perplexity(cm, text, context=512, stride=256)


def test_the_ranking_predicts_the_damage_and_compensation_helps(setup, tinylm_captured):
    model, text, calibration = setup
    original = perplexity(model, text, context=512, stride=256)
    captured = tinylm_captured  # captured once for every pipeline
    top, ppl_top = _compiled_perplexity(captured, text, calibration, "layer_skip.static(n=2)")
    entry = top.report.passes[0]
    print("\n" + "\n".join(entry.notes))
    ranking = entry.stats["ranking"]
    assert entry.stats["removed"] == sorted(ranking[:2])
    _, ppl_bottom = _compiled_perplexity(captured, text, calibration,
                                         f"layer_skip.static(layers={sorted(ranking[-2:])}, probe=false)")
    _, ppl_fitted = _compiled_perplexity(captured, text, calibration,
                                         "layer_skip.static(n=2, compensate=true, probe=false)")
    print(f"held-out perplexity: original {original:.3f}; without the 2 most redundant layers "
          f"{sorted(ranking[:2])} {ppl_top:.3f} ({ppl_top / original - 1:+.1%}); without the 2 least redundant "
          f"{sorted(ranking[-2:])} {ppl_bottom:.3f}; most redundant with affine compensation {ppl_fitted:.3f} "
          f"({ppl_fitted / original - 1:+.1%}); target: within 15% of the original")
    assert ppl_top < ppl_bottom
    assert ppl_fitted < ppl_top
