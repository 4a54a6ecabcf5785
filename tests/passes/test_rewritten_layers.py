"""A weight pass placed after a quantize pass finds no Linear layer left: its report names the earlier
rewrite and the order that would work, not only that nothing was found."""

from __future__ import annotations

import pytest
import torch

import bevel
from tests.models_zoo import MLP, seeded


@pytest.mark.parametrize("second", ['prune.structured(ratio=0.25)', "prune.nm", "lowrank(param_ratio=0.5)",
                                    "quantize.int4_weight(group_size=16)"])
def test_a_pass_after_quantizing_names_the_earlier_rewrite(second):
    model = MLP(sizes=(32, 64, 16)).eval()
    batches = [(torch.randn(64, 32, generator=seeded(i)),) for i in range(2)]
    compiled = bevel.compile(model, f"quantize.int8_weight | {second}", example_inputs=batches[0],
                             calibration=batches)
    first, entry = compiled.report.passes
    assert first.status == "applied" and entry.status == "no change"
    name = second.split("(")[0]
    (note,) = [n for n in entry.notes if "earlier pass" in n]
    assert note == (f"2 Linear layer(s) were already rewritten by an earlier pass (2 bevel::int8_weight_linear), "
                    f"and {name} does not act on them: put {name} before that pass in the pipeline")


def test_no_note_where_nothing_was_rewritten():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    entry = bevel.compile(model, "quantize.int8_weight", example_inputs=(x,)).report.passes[0]
    assert entry.status == "no change" and not [n for n in entry.notes if "earlier pass" in n]
