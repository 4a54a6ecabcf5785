"""The fidelity figures: cosine, max abs error, top-1 agreement, and outputs that hold inf or NaN."""

from __future__ import annotations

import pytest
import torch

import bevel
from bevel.compiler.fidelity import compare, flatten_outputs
from tests.models_zoo import right_padded_ids


def fidelity(reference, candidate):
    return compare([flatten_outputs(reference)], [flatten_outputs(candidate)])


def test_identical_outputs_are_perfect():
    x = torch.randn(4, 10)
    result = fidelity({"logits": x}, {"logits": x.clone()})
    assert result.cosine == pytest.approx(1.0) and result.max_abs_error == 0.0 and result.top1_agreement == 1.0


def test_cosine_is_the_worst_sample_and_error_the_largest_entry():
    ref = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    new = torch.tensor([[0.0, 1.0], [1.0, 1.5]])  # sample 0 is orthogonal to its reference
    result = fidelity((ref,), (new,))
    assert result.cosine == pytest.approx(0.0, abs=1e-12)
    assert result.max_abs_error == pytest.approx(1.0)


def test_top1_counts_changed_argmax_only_for_logits():
    ref = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 5.0], [2.0, 2.5, 0.0]])
    new = ref.clone()
    new[1] = torch.tensor([0.0, 1.0, 2.0])  # argmax moves in one row of four
    assert fidelity({"logits": ref}, {"logits": new}).top1_agreement == pytest.approx(0.75)
    assert fidelity({"hidden": ref}, {"hidden": new}).top1_agreement is None  # not logits by name
    assert fidelity({"hidden": ref, "other": ref}, {"hidden": new, "other": ref}).top1_agreement is None


def test_matching_infinities_do_not_count_as_a_loss():
    ref = torch.tensor([[0.5, float("-inf"), 1.0], [1.0, 2.0, float("nan")]])
    same = fidelity((ref,), (ref.clone(),))
    assert same.cosine == pytest.approx(1.0) and same.max_abs_error == 0.0
    moved = ref.clone()
    moved[0, 1] = 0.0
    assert fidelity((ref,), (moved,)).cosine == -1.0
    new_nan = torch.ones(2, 3)
    new_nan[0, 0] = float("nan")
    assert fidelity((torch.ones(2, 3),), (new_nan,)).cosine == -1.0


def test_per_output_cosines_are_kept_by_name():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    result = fidelity({"first": a, "second": b}, {"first": a, "second": -b})
    assert result.per_output["first"] == pytest.approx(1.0)
    assert result.per_output["second"] == pytest.approx(-1.0)
    assert result.cosine == pytest.approx(-1.0)


def test_with_a_padding_mask_per_token_outputs_are_compared_at_real_positions_only():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    hidden, pooled = torch.randn(2, 3, 4), torch.randn(2, 3)  # pooled: [B, C] with C equal to N by chance
    garbage = hidden.clone()
    garbage[mask == 0] = torch.randn(3, 4)  # what a pass leaves at padded positions
    ref, new = {"hidden": hidden, "pooled": pooled}, {"hidden": garbage, "pooled": pooled}
    assert compare([flatten_outputs(ref)], [flatten_outputs(new)]).cosine < 0.99  # without the mask: a loss
    masked = compare([flatten_outputs(ref)], [flatten_outputs(new)], padding=[mask])
    assert masked.cosine == pytest.approx(1.0) and masked.max_abs_error == 0.0
    wrong = garbage.clone()
    wrong[0, 1] += 1.0  # a real position changed still counts
    result = compare([flatten_outputs(ref)], [flatten_outputs({"hidden": wrong, "pooled": pooled})], padding=[mask])
    assert result.max_abs_error == pytest.approx(1.0) and result.per_output["hidden"] < 1.0
    assert result.per_output["pooled"] == pytest.approx(1.0)
    moved = pooled.clone()
    moved[1, 2] += 1.0  # a per-sample output is compared whole, whatever its shape
    result = compare([flatten_outputs(ref)], [flatten_outputs({"hidden": garbage, "pooled": moved})], padding=[mask])
    assert result.per_output["pooled"] < 1.0


def _min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double()).min())


def test_an_encoders_padded_positions_are_left_out_of_every_pass_fidelity(minilm, minilm_inputs,
                                                                          minilm_calibration):
    """The padding mask is found from the model's attention when compiling, so a pass that does not
    touch tokens (W8A8 quantization, which moves MiniLM's padded positions far more than its real
    ones) is also judged at real positions only."""
    import bevel

    compiled = bevel.compile(minilm, "quantize.int8_dynamic", example_inputs=minilm_inputs,
                             calibration=minilm_calibration)
    got = compiled.report["quantize.int8_dynamic"].fidelity.per_output["last_hidden_state"]
    masked, whole = [], []
    with torch.no_grad():
        for ids, mask in minilm_calibration:
            want, new = minilm(ids, mask).last_hidden_state, compiled(ids, mask)["last_hidden_state"]
            real = mask.bool()[..., None]
            masked.append(_min_cosine(want * real, new * real))
            whole.append(_min_cosine(want, new))
    print(f"int8_dynamic on MiniLM, last_hidden_state min cosine: {min(masked):.5f} at real positions, "
          f"{min(whole):.5f} with the padded ones")
    assert got == pytest.approx(min(masked), abs=1e-6)
    assert min(whole) < min(masked) - 0.01  # what the padded positions would have cost


def test_an_encoder_whose_attention_is_not_sdpa_is_compared_at_real_positions_only():
    """DeBERTa's attention (matmuls, its own softmax) gave the blocks' matcher no padding mask, so its
    padded positions were compared: removing a block reported cosine 0.150 where real tokens keep
    0.9997, and a fidelity budget rolled the pass back. Its ``attention_mask`` input is the mask."""
    from transformers import DebertaV2Config, DebertaV2Model

    torch.manual_seed(0)
    model = DebertaV2Model(DebertaV2Config(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=128, max_position_embeddings=128)).eval()
    generator = torch.Generator().manual_seed(0)
    example, *calibration = [right_padded_ids(generator, 500, [16, 3, 9, 12], 16) for _ in range(4)]
    cm = bevel.compile(model, "layer_skip.static(layers=[0])", example_inputs=example, calibration=calibration,
                       max_fidelity_drop=0.01)
    entry = cm.report.passes[0]
    real, every = [], []
    with torch.no_grad():
        for ids, mask in calibration:
            got, want = cm(ids, mask).last_hidden_state, model(ids, mask).last_hidden_state
            for row in range(4):
                kept = mask[row].bool()
                real.append(torch.nn.functional.cosine_similarity(got[row][kept].flatten(), want[row][kept].flatten(),
                                                                  dim=0))
                every.append(torch.nn.functional.cosine_similarity(got[row].flatten(), want[row].flatten(), dim=0))
    assert min(every) < 0.5 < 0.999 < min(real)  # padding alone would fail the budget
    assert entry.status == "applied" and entry.fidelity.cosine == pytest.approx(float(min(real)), abs=1e-4)
