"""``layer_skip.early_exit`` on random HF Llama and BERT configs.

Differentials, on prompts the compile never saw:
- ``threshold=1.0``: no confidence is above 1, so no token exits; logits within 1e-5 of eager (the
  same ops run: float rounding only).
- a forced exit (a threshold below every confidence) after each possible block k equals the model
  truncated to its first k blocks, built independently from the HF model (1e-5): in the graph, in
  the runtime's block-by-block forward, and token for token in greedy generation.
- mixed exits (a threshold among the measured confidences) equal an independent eager implementation
  of the rule, forward hooks on the HF layers (1e-5); generation, where rows leave the batch at
  different blocks and skipped layers' cache entries are filled from the exit state, emits the
  argmax of the graph's teacher-forced logits at every step. Each such test first checks that no
  confidence lies within 1e-4 of the threshold, so rounding cannot flip an exit decision.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

import bevel
from bevel.ir.decoder import prefill_inputs
from bevel.passes import get_pass
from bevel.passes.layer_skip.early_exit import exit_depths
from tests.decoders import padded_prompts, positions_of, small_causal_lm
from tests.models_zoo import right_padded_ids

LAYERS = 4


def reference_early_exit(model, ids, mask, threshold, min_layer, criterion="max_prob", shared=False, every=1):
    """Eager logits under the exit rule, computed with hooks on the HF decoder layers: a token's
    hidden state is kept once it has exited; after block ``min_layer - 1`` and every ``every``-th
    one after it, up to the one before last, the model's own norm and head decide. Returns
    (logits, depths, confidences)."""
    layers, total = model.model.layers, len(model.model.layers)
    state = {"depth": None, "confidences": []}

    def hook(index):
        def after(module, args, kwargs, output):
            hidden_in, depth = args[0], state["depth"]
            if depth is not None:
                output = torch.where((depth <= index)[..., None], hidden_in, output)
            if min_layer - 1 <= index < total - 1 and (index - min_layer + 1) % every == 0:
                probabilities = model.lm_head(model.model.norm(output)).float().softmax(-1)
                top = probabilities.topk(2, dim=-1).values
                confidence = top[..., 0] if criterion == "max_prob" else top[..., 0] - top[..., 1]
                state["confidences"].append(confidence)
                if depth is None:
                    depth = torch.full(confidence.shape, total)
                exits = (confidence > threshold) | (depth <= index)
                if shared:
                    exits = exits.all(dim=0, keepdim=True).expand_as(exits).long().cummax(dim=1).values.bool()
                state["depth"] = torch.where(exits & (depth > index), index + 1, depth)
            return output
        return after

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, position_ids=positions_of(mask)).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, state["depth"], torch.stack(state["confidences"])


def truncated(model, blocks):
    """An independent copy of ``model`` with only its first ``blocks`` decoder layers."""
    short = copy.deepcopy(model)
    short.model.layers = short.model.layers[:blocks]
    short.config.num_hidden_layers = blocks
    return short


def teacher_forced_logits(cm, prompt_mask, sequences):
    """The graph's own logits (``cm.step``, not the runtime) over prompts and their continuations."""
    mask = torch.cat([prompt_mask, torch.ones_like(sequences[:, prompt_mask.shape[1]:])], dim=1)
    return cm.step(*prefill_inputs(cm.spec, sequences, mask))["logits"]


@pytest.fixture(scope="module")
def llama():
    model = small_causal_lm("llama", layers=LAYERS, seed=4)
    with torch.no_grad():  # a sharper head: random weights alone give near-uniform predictions
        model.lm_head.weight.mul_(40)
    return model


@pytest.fixture(scope="module")
def calibration():
    return [padded_prompts([6, 4, 8], seed=s) for s in range(2)]


@pytest.fixture(scope="module")
def captured(llama, calibration):
    """llama captured once (bevel.capture) for the compiles below, as compiling it itself would."""
    return bevel.capture(llama, calibration[0])


def test_threshold_one_changes_nothing(llama, captured, calibration):
    cm = bevel.compile(captured, "layer_skip.early_exit(threshold=1.0, min_layer=1)", calibration=calibration)
    entry = cm.report.passes[0]
    assert entry.status == "applied" and entry.stats["average_depth"] == LAYERS
    ids, mask = padded_prompts([9, 3, 7], seed=11)
    eager = llama(ids, attention_mask=mask, position_ids=positions_of(mask)).logits
    assert (cm(ids, mask) - eager)[mask.bool()].abs().max().item() < 1e-5
    assert cm.early_exit.average_depth == LAYERS
    expected = llama.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    assert torch.equal(cm.generate(ids, 6, attention_mask=mask, eos_token_id=None), expected)


@pytest.mark.parametrize("blocks", range(1, LAYERS))
def test_a_forced_exit_equals_the_truncated_model(llama, captured, calibration, blocks):
    cm = bevel.compile(captured, f"layer_skip.early_exit(threshold=1e-9, min_layer={blocks})",
                       calibration=calibration)
    assert cm.report.passes[0].stats["average_depth"] == blocks
    short = truncated(llama, blocks)
    ids, mask = padded_prompts([5, 8, 2], seed=12)
    eager = short(ids, attention_mask=mask, position_ids=positions_of(mask)).logits
    real = mask.bool()
    assert (cm.step(*prefill_inputs(cm.spec, ids, mask))["logits"] - eager)[real].abs().max().item() < 1e-5
    assert (cm(ids, mask) - eager)[real].abs().max().item() < 1e-5  # the runtime, block by block
    expected = short.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    assert torch.equal(cm.generate(ids, 6, attention_mask=mask, eos_token_id=None), expected)
    assert cm.early_exit.depth_counts() == {blocks: cm.early_exit.tokens}


@pytest.mark.parametrize("before", ["quantize.int8_weight", "lowrank(energy=0.95)"])
def test_exits_after_a_pass_that_rewrote_the_head_equal_the_truncated_rewritten_model(captured, calibration, before):
    """quantize and lowrank leave the head's new weights read just before the head; the exits, inserted
    earlier in the graph, must still find them (the pass failed with an fx ordering error)."""
    rewritten = bevel.compile(captured, before, calibration=calibration)
    cm = bevel.compile(captured, f"{before} | layer_skip.early_exit(threshold=1.0, min_layer=1)",
                       calibration=calibration)
    assert [e.status for e in cm.report.passes] == ["applied", "applied"], cm.report.passes[-1].reason
    ids, mask = padded_prompts([5, 8, 2], seed=13)
    real = mask.bool()
    assert (cm(ids, mask) - rewritten(ids, mask))[real].abs().max().item() < 1e-5  # no token exits at 1.0
    assert torch.equal(cm.generate(ids, 6, attention_mask=mask, eos_token_id=None),
                       rewritten.generate(ids, 6, attention_mask=mask, eos_token_id=None))


def _threshold_among(confidences: torch.Tensor) -> float:
    """A threshold in the middle of the largest gap between the measured confidences near their
    median, so that some tokens exit and others do not."""
    values = confidences.flatten().sort().values
    middle = values[len(values) // 4: 3 * len(values) // 4]
    gaps = middle[1:] - middle[:-1]
    best = int(gaps.argmax())
    return float((middle[best] + middle[best + 1]) / 2)


@pytest.mark.parametrize("criterion, every", [("max_prob", 1), ("margin", 1), ("max_prob", 2)])
def test_mixed_exits_equal_an_eager_implementation_and_generation_follows_the_graph(llama, captured, calibration,
                                                                                   criterion, every):
    ids, mask = padded_prompts([7, 10, 4], seed=13)
    _, _, confidences = reference_early_exit(llama, ids, mask, 1.0, 1, criterion, every=every)
    threshold = _threshold_among(confidences[:, mask.bool()])
    expected, depth, confidences = reference_early_exit(llama, ids, mask, threshold, 1, criterion, every=every)
    assert (confidences[:, mask.bool()] - threshold).abs().min() > 1e-4
    assert len(depth[mask.bool()].unique()) >= 3  # tokens leave at several depths
    cm = bevel.compile(captured, f"layer_skip.early_exit(threshold={threshold!r}, min_layer=1, every={every}, "
                              f"criterion=\"{criterion}\")", calibration=calibration)
    graph_logits = cm.step(*prefill_inputs(cm.spec, ids, mask))["logits"]
    real = mask.bool()
    assert (graph_logits - expected)[real].abs().max().item() < 1e-5
    assert (cm(ids, mask) - expected)[real].abs().max().item() < 1e-5
    # the graph's own depths, read from its last decision, are the eager ones
    graph_depth = exit_depths(cm.graph_module, prefill_inputs(cm.spec, ids, mask))
    assert torch.equal(graph_depth[real], depth[real])

    # rows that have left are gathered out of the batch (compaction) or run along, frozen
    runs = {}
    for share in (1.0, 0.0):
        cm.early_exit.reset()
        cm.early_exit.compact_share = share
        runs[share] = cm.generate(ids, 8, attention_mask=mask, eos_token_id=None)
        assert len(cm.early_exit.depth_counts()) >= 2
        assert (cm.early_exit.compacted > 0) == (share == 1.0)
    assert torch.equal(runs[1.0], runs[0.0])
    generated = runs[1.0]
    forced = teacher_forced_logits(cm, mask, generated)
    prompt = ids.shape[1]
    assert torch.equal(forced[:, prompt - 1:-1].argmax(-1), generated[:, prompt:])


def test_skipdecode_shares_one_non_increasing_depth_per_position(llama, captured, calibration):
    ids = padded_prompts([9, 9], seed=14)[0]
    mask = torch.ones_like(ids)
    _, _, confidences = reference_early_exit(llama, ids, mask, 1.0, 1, shared=True)
    threshold = float(confidences.quantile(0.6))
    expected, depth, confidences = reference_early_exit(llama, ids, mask, threshold, 1, shared=True)
    assert (confidences - threshold).abs().min() > 1e-4
    cm = bevel.compile(captured, f"layer_skip.early_exit(threshold={threshold!r}, min_layer=1, mode=\"skipdecode\")",
                       calibration=calibration)
    steps = prefill_inputs(cm.spec, ids, mask)
    assert (cm.step(*steps)["logits"] - expected).abs().max().item() < 1e-5
    assert (cm(ids, mask) - expected).abs().max().item() < 1e-5
    graph_depth = exit_depths(cm.graph_module, steps)
    assert torch.equal(graph_depth, depth)

    generated = cm.generate(ids, 10, eos_token_id=None)
    forced = teacher_forced_logits(cm, mask, generated)
    assert torch.equal(forced[:, ids.shape[1] - 1:-1].argmax(-1), generated[:, ids.shape[1]:])
    depths = exit_depths(cm.graph_module, prefill_inputs(cm.spec, generated))
    assert torch.equal(depths[0], depths[1])  # shared by the batch
    assert bool((depths[0, 1:] <= depths[0, :-1]).all())  # never rising along the sequence
    assert len(depths[0].unique()) >= 2


def reference_classifier_exit(model, ids, mask, threshold, min_layer):
    """A BERT classifier's logits under the exit rule, per sample, with hooks on its encoder layers
    and its own pooler and classifier as the exit head (as :func:`reference_early_exit`). Returns
    (logits, depths, confidences)."""
    layers, total = model.bert.encoder.layer, len(model.bert.encoder.layer)
    state = {"depth": None, "confidences": []}

    def hook(index):
        def after(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            depth = state["depth"]
            if depth is not None:
                hidden_out = torch.where((depth <= index)[:, None, None], hidden_in, hidden_out)
            if min_layer - 1 <= index < total - 1:
                confidence = model.classifier(model.bert.pooler(hidden_out)).softmax(-1).amax(-1)
                state["confidences"].append(confidence)
                if depth is None:
                    depth = torch.full(confidence.shape, total)
                state["depth"] = torch.where((confidence > threshold) & (depth > index), index + 1, depth)
            return (hidden_out, *output[1:]) if isinstance(output, tuple) else hidden_out
        return after

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits
        return logits, state["depth"], torch.stack(state["confidences"])
    finally:
        for handle in handles:
            handle.remove()


def test_an_encoders_average_depth_counts_its_real_tokens_only():
    """A masked LM exits per token; its padded positions were counted in the report's depth."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                       intermediate_size=64, initializer_range=0.2)).eval()
    generator = torch.Generator().manual_seed(0)

    def batch():
        return right_padded_ids(generator, 100, [12, 3, 5, 8], 12)

    calibration = [batch() for _ in range(2)]
    cm = bevel.compile(model, "layer_skip.early_exit(threshold=0.05, min_layer=1)", example_inputs=batch(),
                       calibration=calibration)
    entry = cm.report.passes[0]
    real = sum(int(mask.sum()) for _, mask in calibration)
    assert entry.stats["tokens"] == real == 56  # of 96 positions
    assert f"on {real} calibration tokens" in entry.notes[0]
    depths = torch.cat([exit_depths(cm.graph_module, b)[b[1].bool()] for b in calibration])
    assert entry.stats["average_depth"] == pytest.approx(float(depths.double().mean()), abs=1e-6)
    # and so does the counter of what the compiled module ran
    cm.early_exit.reset()
    for ids, mask in calibration:
        cm(ids, mask)
    assert cm.early_exit.tokens == real
    assert cm.early_exit.average_depth == pytest.approx(entry.stats["average_depth"], abs=1e-6)


def test_a_classifier_exits_per_sample_and_exited_samples_leave_the_batch():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                        vocab_size=100, num_labels=3)
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():  # a sharper classifier, so that some samples are confident early
        model.classifier.weight.mul_(60)
    ids, mask = torch.randint(0, 100, (6, 7)), torch.ones(6, 7, dtype=torch.long)
    fresh, fresh_mask = torch.randint(0, 100, (9, 11)), torch.ones(9, 11, dtype=torch.long)
    fresh_mask[2, 7:] = 0
    with torch.no_grad():
        expected = model(fresh, attention_mask=fresh_mask).logits
    same = bevel.compile(model, "layer_skip.early_exit(threshold=1.0)", example_inputs=(ids, mask))
    assert (same(fresh, fresh_mask).logits - expected).abs().max().item() < 1e-5

    short = copy.deepcopy(model)
    short.bert.encoder.layer = short.bert.encoder.layer[:1]
    with torch.no_grad():
        truncated_logits = short(fresh, attention_mask=fresh_mask).logits
    forced = bevel.compile(model, "layer_skip.early_exit(threshold=1e-9, min_layer=1)", example_inputs=(ids, mask))
    assert forced.report.passes[0].stats["average_depth"] == 1
    assert (forced(fresh, fresh_mask).logits - truncated_logits).abs().max().item() < 1e-5

    threshold = 0.45
    mixed_logits, depth, confidences = reference_classifier_exit(model, fresh, fresh_mask, threshold, 1)
    assert len(depth.unique()) >= 2 and (confidences - threshold).abs().min() > 1e-4
    mixed = bevel.compile(model, f"layer_skip.early_exit(threshold={threshold}, min_layer=1)",
                          example_inputs=(ids, mask))
    assert "calibration samples" in mixed.report.passes[0].notes[0]
    mixed.early_exit.compact_share = 1.0  # gather the running samples whenever some have left
    assert (mixed(fresh, fresh_mask).logits - mixed_logits).abs().max().item() < 1e-5
    assert mixed.early_exit.compacted > 0
    assert mixed.early_exit.depth_counts() == {d: int((depth == d).sum()) for d in depth.unique().tolist()}


@pytest.mark.parametrize("value", [0, -0.5, 1.5])
def test_a_threshold_outside_zero_one_is_refused_naming_it(llama, value):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(bevel.ParamError) as error:
        get_pass("layer_skip.early_exit")(threshold=value)
    assert error.value.key == "threshold" and "threshold must be in (0.0, 1.0]" in str(error.value)
    with pytest.raises(bevel.ParamError, match="threshold"):
        bevel.compile(llama, f"layer_skip.early_exit(threshold={value})",
                      example_inputs=(torch.randint(3, 300, (2, 4)),))
    assert all(torch.equal(v, before[k]) for k, v in llama.state_dict().items())


@pytest.mark.parametrize("text, key", [("layer_skip.early_exit(min_layer=0)", "min_layer"),
                                       ("layer_skip.early_exit(criterion=\"entropy\")", "criterion"),
                                       ("layer_skip.early_exit(mode=\"layer\")", "mode")])
def test_other_bad_params_are_refused_before_any_work(llama, text, key):
    with pytest.raises(bevel.ParamError) as error:
        bevel.compile(llama, text, example_inputs=(torch.randint(3, 300, (2, 4)),))
    assert error.value.key == key


def test_min_layer_at_the_block_count_fails_the_pass_with_a_reason(captured, calibration):
    cm = bevel.compile(captured, f"layer_skip.early_exit(min_layer={LAYERS})", calibration=calibration)
    entry = cm.report.passes[0]
    assert entry.status == "failed"
    assert re.search(f"min_layer={LAYERS}.*has {LAYERS} repeated blocks", entry.reason), entry.reason


def test_a_model_without_repeated_blocks_is_left_unchanged():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    cm = bevel.compile(model, "layer_skip.early_exit", example_inputs=(torch.randn(3, 8),))
    entry = cm.report.passes[0]
    assert entry.status == "no change" and "no repeated blocks" in entry.notes[0]


class ResidualBlock(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.linear(x))


class MaskedPoolingClassifier(torch.nn.Module):
    """Blocks in a ModuleList, then a head that pools with the attention mask (another input)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([ResidualBlock(8) for _ in range(3)])
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head((x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))


def test_a_model_without_a_usable_head_says_what_is_missing():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    base = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                vocab_size=100), add_pooling_layer=False).eval()
    cm = bevel.compile(base, "layer_skip.early_exit", example_inputs=(torch.randint(0, 100, (2, 5)),))
    entry = cm.report.passes[0]
    assert entry.status == "no change"
    assert "returns the last block's hidden state" in entry.notes[0] and "no head" in entry.notes[0]

    pooled = MaskedPoolingClassifier().eval()
    cm = bevel.compile(pooled, "layer_skip.early_exit", example_inputs=(torch.randn(2, 5, 8), torch.ones(2, 5)))
    entry = cm.report.passes[0]
    assert entry.status == "no change" and "(computed from the input mask)" in entry.notes[0], entry.notes


def test_after_a_removed_block_a_threshold_no_token_reaches_changes_nothing():
    """Blocks are counted as they run: with layers.1 removed, layers.3 is the last of three. Numbered by
    module, the exit after it froze every token at layers.2's output (logits off by 0.38)."""
    model = small_causal_lm("llama", layers=4)
    ids, mask = padded_prompts([8, 5], seed=2)
    captured = bevel.capture(model, example_inputs=(ids, mask))
    removed = bevel.compile(captured, "layer_skip.static(layers=[1])")
    both = bevel.compile(captured, "layer_skip.static(layers=[1]) | layer_skip.early_exit(threshold=1.0)")
    assert both.report.passes[1].status == "applied"
    real = mask.bool()
    torch.testing.assert_close(both(ids, mask)[real], removed(ids, mask)[real], atol=1e-6, rtol=0)
    assert torch.equal(both.generate(ids, max_new_tokens=6, attention_mask=mask, eos_token_id=None),
                       removed.generate(ids, max_new_tokens=6, attention_mask=mask, eos_token_id=None))
