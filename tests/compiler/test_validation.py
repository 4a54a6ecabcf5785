"""``validation`` batches: the fidelity on inputs no pass read, after capture and after each applied pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bevel
from bevel.compiler.report import Report
from bevel.errors import BevelError, CaptureError
from bevel.ir.graph import Graph
from bevel.passes import Pass, PassContext, PassResult, register_pass

PRUNE = 'prune.structured(target="mlp", ratio=0.5)'


def small_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32), torch.nn.GELU(),
                               torch.nn.Linear(32, 10)).eval()


def test_the_held_out_figures_show_what_a_fit_to_the_calibration_batches_keeps_on_new_inputs():
    model = small_mlp()
    generator = torch.Generator().manual_seed(1)
    # 8 calibration rows for layers of 32 and 64 inputs: the refit of the pruned layers is exact on them
    calibration = [(torch.randn(4, 32, generator=generator),) for _ in range(2)]
    validation = [(torch.randn(16, 32, generator=generator),) for _ in range(2)]
    compiled = bevel.compile(model, PRUNE, calibration=calibration, validation=validation)
    entry = compiled.report.passes[0]
    assert entry.status == "applied" and entry.fidelity.cosine > 0.999
    with torch.no_grad():
        pairs = [(compiled(x), model(x)) for (x,) in validation]
    cosine = min(float(F.cosine_similarity(got, want, dim=-1).min()) for got, want in pairs)
    top1 = sum(int((got.argmax(-1) == want.argmax(-1)).sum()) for got, want in pairs) / 32
    assert entry.quality["held-out cosine"] == pytest.approx(cosine, abs=1e-5)
    assert entry.quality["held-out top-1"] == pytest.approx(top1)
    print(f"{PRUNE} on 8 calibration rows: cosine {entry.fidelity.cosine:.5f} on them, {cosine:.5f} held out")
    assert cosine < entry.fidelity.cosine - 0.1  # what the calibration figure does not show
    assert compiled.report.quality["held-out cosine"] == pytest.approx(1.0, abs=1e-6)  # the captured graph
    text = str(compiled.report)
    assert "held-out quality: before the passes held-out cosine 1" in text
    assert f"after {entry.name} held-out cosine {cosine:.4g}" in text
    again = Report.from_json(compiled.report.to_json())
    assert again.passes[0].quality == entry.quality and again.quality == compiled.report.quality


def test_without_validation_batches_the_report_has_no_held_out_figures():
    compiled = bevel.compile(small_mlp(), PRUNE, calibration=[(torch.randn(64, 32),)])
    assert compiled.report.quality == {} and compiled.report.passes[0].quality == {}
    assert "held-out" not in str(compiled.report)


def test_a_validation_batch_the_model_cannot_take_is_named_and_the_model_is_untouched():
    model = small_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CaptureError, match=r"Sequential fails on validation batch 1 "
                                           r"\(input shapes \[\(4, 31\)\]\) before capture"):
        bevel.compile(model, PRUNE, calibration=[(torch.randn(64, 32),)],
                      validation=[(torch.randn(4, 32),), (torch.randn(4, 31),)])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_validation_batch_the_captured_graph_cannot_take_is_named():
    with pytest.raises(CaptureError, match=r"the captured graph fails on validation batch 0 \(input shapes "
                                           r"\[\(6, 32\)\]\).*must fit the shapes the graph was captured with"):
        bevel.compile(small_mlp(), "cleanup", example_inputs=(torch.randn(4, 32),), dynamic_shapes="static",
                      validation=[(torch.randn(6, 32),)])


def test_validation_that_is_not_a_list_of_batches_is_named():
    with pytest.raises(BevelError, match="validation must be an iterable of input tuples"):
        bevel.compile(small_mlp(), "cleanup", example_inputs=(torch.randn(4, 32),), validation=torch.randn(4, 32))


def test_validation_on_a_causal_lm_points_to_eval_text():
    from tests.decoders import padded_prompts, small_causal_lm

    ids, mask = padded_prompts([5, 3])
    with pytest.raises(BevelError, match="validation batches apply to models that are not causal LMs.*eval_text"):
        bevel.compile(small_causal_lm("llama"), "cleanup", example_inputs=(ids, mask), validation=[(ids, mask)])


def test_an_encoders_held_out_figure_compares_the_real_tokens_of_each_validation_batch():
    """``unpad`` changes only what an encoder outputs at padded positions: held out it keeps 1, which
    it would not if the validation batches were compared with other masks or none."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64)).eval()

    def padded(lengths, tokens=10):
        mask = (torch.arange(tokens) < torch.tensor(lengths)[:, None]).long()
        return torch.randint(5, 100, (len(lengths), tokens)), mask

    validation = [padded([2, 10, 5, 8]), padded([10, 1, 9, 4])]
    compiled = bevel.compile(model, "unpad", calibration=[padded([10, 4, 6]), padded([7, 10, 3])],
                             validation=validation)
    assert compiled.report.passes[0].quality["held-out cosine"] == pytest.approx(1.0, abs=1e-6)
    ids, mask = validation[0]
    with torch.no_grad():
        got, want = compiled(ids, mask).last_hidden_state, model(ids, mask).last_hidden_state
    assert float(F.cosine_similarity(got.flatten(1), want.flatten(1)).min()) < 0.9  # padded positions differ


@register_pass("test.validation.fixed_batch")
class FixedBatch(Pass):
    """Reshapes the input to the calibration batch's size: the graph then runs on the calibration
    batches and on no other batch size."""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        x = next(n for n in graph.fx_graph.nodes if n.op == "placeholder")
        rows, features = ctx.calibration[0][0].shape
        with graph.fx_graph.inserting_after(x):
            fixed = graph.fx_graph.call_function(torch.ops.aten.view.default, (x, [rows, features]))
        x.replace_all_uses_with(fixed, delete_user_cb=lambda user: user is not fixed)
        graph.refresh()
        return PassResult(changed=True)


def test_a_pass_whose_graph_fails_on_the_validation_batches_is_rolled_back_naming_them():
    model = small_mlp()
    compiled = bevel.compile(model, "cleanup | test.validation.fixed_batch", calibration=[(torch.randn(4, 32),)],
                             validation=[(torch.randn(6, 32),)])
    entry = compiled.report.passes[1]
    assert entry.status == "rolled back" and entry.quality == {}
    assert entry.reason.startswith("the rewritten graph fails on the validation batches: RuntimeError")
    x = torch.randn(6, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))  # the graph before the pass
