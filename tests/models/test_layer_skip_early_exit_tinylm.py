"""``layer_skip.early_exit`` on the trained tinylm: the held-out perplexity against the average depth
at three thresholds (printed), and generation through ``generate()`` and through an artifact loaded
in a fresh process.

tinylm was not trained to exit early: its final head reads the earlier layers' hidden states
poorly, so exits cost perplexity, the more the lower the threshold. The test asserts that direction
(fewer blocks and a higher perplexity at the lowest threshold than at the highest), not figures.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import bevel
from bevel.eval import perplexity
from bevel.ir.decoder import prefill_inputs
from bevel.models import tinylm

HELD_OUT_BYTES = 4096  # a slice of the held-out split, scored with 512 bytes of context
THRESHOLDS = (0.6, 0.8, 0.9)
BLOCKS = tinylm.CONFIG["num_hidden_layers"]


@pytest.fixture(scope="module")
def model(tinylm_model):
    return tinylm_model


@pytest.fixture(scope="module")
def calibration():
    return tinylm.text_windows(count=1, batch_size=2, length=128)


@pytest.fixture(scope="module")
def compiled(tinylm_captured, calibration):
    return {threshold: bevel.compile(tinylm_captured, f"layer_skip.early_exit(threshold={threshold})",
                                     calibration=calibration, max_cache_len=1024)
            for threshold in THRESHOLDS}


def test_perplexity_against_average_depth(model, calibration, compiled):
    text = tinylm.held_out_text()[:HELD_OUT_BYTES]
    original = perplexity(model, text, context=512, stride=256)
    rows = []
    for threshold, cm in compiled.items():
        entry = cm.report.passes[0]
        assert entry.status == "applied"
        # the runtime's depths on the calibration windows are the ones the report gives
        cm.early_exit.reset()
        for (ids,) in calibration:
            cm(ids)
        assert cm.early_exit.average_depth == pytest.approx(entry.stats["average_depth"], abs=1e-6)
        cm.early_exit.reset()
        rows.append((threshold, perplexity(cm, text, context=512, stride=256), cm.early_exit.average_depth))
    print(f"\ntinylm, {HELD_OUT_BYTES} held-out bytes: original perplexity {original:.3f} with {BLOCKS} blocks")
    for threshold, ppl, depth in rows:
        print(f"early_exit(threshold={threshold}): perplexity {ppl:.3f} ({ppl / original - 1:+.1%}), "
              f"average depth {depth:.2f} ({depth / BLOCKS - 1:+.1%})")
    (_, low_ppl, low_depth), (_, mid_ppl, mid_depth), (_, high_ppl, high_depth) = rows
    assert low_depth < mid_depth < high_depth < BLOCKS
    assert low_ppl > high_ppl


FRESH_PROCESS = """
import sys, torch, bevel
cm = bevel.load(sys.argv[1])
ids, mask = torch.load(sys.argv[2])
out = cm.generate(ids, int(sys.argv[3]), attention_mask=mask)
torch.save({"tokens": out, "whole": cm.decode_graph.whole, "depth": cm.early_exit.average_depth}, sys.argv[4])
"""


def test_generation_follows_the_graph_and_survives_a_fresh_process(compiled, tmp_path):
    cm = compiled[0.8]
    ids, mask = tinylm.prompts(["The object model of Python", "A function"])
    cm.early_exit.reset()
    new = 32
    out = cm.generate(ids, new, attention_mask=mask)
    print("\n" + "\n".join(repr(tinylm.decode(row)) for row in out))
    assert cm.early_exit.average(decode_only=True) < BLOCKS  # tokens left early while decoding
    # every greedy token is the argmax of the graph's own (teacher-forced) logits at its position
    full_mask = torch.cat([mask, torch.ones(2, new, dtype=mask.dtype)], dim=1)
    logits = cm.step(*prefill_inputs(cm.spec, out, full_mask))["logits"]
    assert torch.equal(logits[:, ids.shape[1] - 1:-1].argmax(-1), out[:, ids.shape[1]:])

    artifact, inputs, result = tmp_path / "art", tmp_path / "prompts.pt", tmp_path / "out.pt"
    cm.save(str(artifact))
    torch.save((ids, mask), inputs)
    script = tmp_path / "generate.py"
    script.write_text(FRESH_PROCESS)
    run = subprocess.run([sys.executable, str(script), str(artifact), str(inputs), str(new), str(result)],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = torch.load(result)
    assert torch.equal(loaded["tokens"], out)
    assert loaded["whole"] is False  # the loaded decoder also runs block by block
    assert loaded["depth"] == pytest.approx(cm.early_exit.average_depth)
