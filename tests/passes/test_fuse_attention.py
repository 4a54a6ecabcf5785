"""fuse_attention: attention written out as matmul, softmax, matmul becomes scaled_dot_product_attention.

Differential tolerance: the fused kernel computes the same softmax(q k^T * scale + mask) v in float32
with another summation order (blocks of keys, an online softmax), so outputs agree to rounding:
1e-5 relative to the outputs' scale on these small models (a wrong scale, mask or transpose moves
them by 1e-1 and more). On MiniLM the sentence embeddings' cosine is checked to 0.99999.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import bevel
from bevel.errors import ParamError
from bevel.ir import capture
from bevel.models import minilm as minilm_model
from bevel.passes import PassContext, get_pass
from tests.models_zoo import MaskedAttentionBlock, MaskedEncoder, padded_tokens, seeded

SDPA = torch.ops.aten.scaled_dot_product_attention.default


class MultiheadWithWeights(nn.Module):
    """nn.MultiheadAttention as most code calls it: need_weights=True (bmm, softmax, bmm), with an
    additive attention mask (baddbmm) in the second call."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.MultiheadAttention(32, 4), nn.MultiheadAttention(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.first(x, x, x)[0]
        n = x.shape[0]
        local = torch.triu(torch.full((n, n), -2.0), diagonal=3)  # float mask: a soft penalty far ahead
        return x + self.second(x, x, x, attn_mask=local)[0]


class ReturnsWeights(MaskedAttentionBlock):
    """The attention weights are an output too: the chain must stay."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) * 0.25).softmax(dim=-1)
        return (weights @ v).sum(), weights


def fused(model: nn.Module, example: tuple) -> tuple:
    graph = capture(model.eval(), example)
    result = get_pass("fuse_attention")().run(graph, PassContext(calibration=[example], example_inputs=example))
    assert graph.lint() == []
    return graph, result


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return float((got - want).abs().max()) <= 1e-5 * max(1.0, float(want.abs().max()))


def test_written_out_attention_becomes_one_fused_op_with_the_same_outputs():
    torch.manual_seed(0)
    model = MaskedEncoder(written_out=True).eval()
    graph, result = fused(model, padded_tokens(seeded(0), 2, 7))
    assert result.changed and result.stats["fused"] == 2
    assert len(list(graph.nodes(target=SDPA))) == 2
    assert not list(graph.nodes(target=(torch.ops.aten.softmax.int, torch.ops.aten._softmax.default)))
    fresh = padded_tokens(seeded(1), 3, 11)  # another batch size and length
    with torch.no_grad():
        assert close(graph(*fresh), model(*fresh))


def test_multihead_attention_with_weights_is_fused_with_its_mask():
    torch.manual_seed(0)
    model = MultiheadWithWeights().eval()
    graph, result = fused(model, (torch.randn(9, 2, 32, generator=seeded(0)),))
    assert result.stats["fused"] == 2  # the weights the module returns are read by nobody
    fresh = torch.randn(12, 3, 32, generator=seeded(1))
    with torch.no_grad():
        assert close(graph(fresh), model(fresh))


def test_multihead_attention_gets_its_heads_unfolded_from_the_batch():
    torch.manual_seed(0)
    graph, _ = fused(MultiheadWithWeights().eval(), (torch.randn(9, 2, 32, generator=seeded(0)),))
    first, second = graph.nodes(target=SDPA)
    for attention in (first, second):  # [batch * heads, tokens, head_dim] in the module
        assert [tuple(graph.shape(node)) for node in attention.args[:3]] == [(2, 4, 9, 8)] * 3
    assert first.args[3] is None
    assert tuple(graph.shape(second.args[3])) == (1, 1, 9, 9)  # the [tokens, tokens] mask shared by all


class MultiheadEncoder(nn.Module):
    """Pre-norm blocks of nn.MultiheadAttention with a padding mask, called with or without its weights."""

    def __init__(self, need_weights: bool, depth: int = 3) -> None:
        super().__init__()
        self.need_weights = need_weights
        self.norms = nn.ModuleList(nn.LayerNorm(32) for _ in range(depth))
        self.attns = nn.ModuleList(nn.MultiheadAttention(32, 4, batch_first=True) for _ in range(depth))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)) for _ in range(depth))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        padding = mask == 0
        for norm, attn, mlp in zip(self.norms, self.attns, self.mlps):
            h = norm(x)
            x = x + attn(h, h, h, key_padding_mask=padding, need_weights=self.need_weights)[0]
            x = x + mlp(x)
        return x


@pytest.mark.parametrize("spec", ["tome(r=2)", "tome(r=3, unmerge=false)",
                                  'prune.structured(target="heads", ratio=0.25)'])
def test_multihead_attention_with_weights_is_merged_and_pruned_as_without_them(spec):
    # nn.MultiheadAttention called as most code calls it (need_weights=True: bmm, softmax, bmm) and with
    # need_weights=False (its own scaled_dot_product_attention) compute the same; once fused, the token
    # and head passes must rewrite the first as they rewrite the second. Tolerance: merging alone is
    # exact up to the fused kernel's rounding (1e-5); head pruning refits the output projection by least
    # squares on activations that differ by that rounding, so it gets 1e-4.
    torch.manual_seed(0)
    with_weights = MultiheadEncoder(need_weights=True).eval()
    without = MultiheadEncoder(need_weights=False).eval()
    without.load_state_dict(with_weights.state_dict())
    example, calibration = padded_tokens(seeded(0), 2, 12), [padded_tokens(seeded(1), 2, 12)]
    got = bevel.compile(with_weights, f"fuse_attention | {spec}", example_inputs=example, calibration=calibration)
    want = bevel.compile(without, spec, example_inputs=example, calibration=calibration)
    name = spec.split("(")[0]
    assert got.report["fuse_attention"].stats["fused"] == 3
    assert got.report[name].status == want.report[name].status == "applied", got.report[name].reason
    for key in ("tokens", "params", "groups"):
        assert got.report[name].stats.get(key) == want.report[name].stats.get(key)
    fresh = padded_tokens(seeded(2), 3, 15)
    with torch.no_grad():
        a, b = got(*fresh), want(*fresh)
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= (1e-4 if name == "prune.structured" else 1e-5) * float(b.abs().max())


def test_attention_whose_weights_are_read_elsewhere_is_left_alone_and_named():
    torch.manual_seed(0)
    model = ReturnsWeights().eval()
    example = padded_tokens(seeded(0), 2, 5)
    graph, result = fused(model, example)
    assert not result.changed
    assert any("left alone: softmax" in note and "read by something else" in note for note in result.notes)
    assert any("nothing changed" in note for note in result.notes)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(graph(*example), model(*example)))


def test_after_fusing_token_merging_finds_the_blocks():
    torch.manual_seed(0)
    model = MaskedEncoder(written_out=True).eval()
    example = padded_tokens(seeded(0), 2, 7)
    alone = bevel.compile(model, "cleanup | tome(r=1)", example_inputs=example)
    assert alone.report["tome"].status == "no change"
    assert any("not recognized" in note for note in alone.report["tome"].notes)
    merged = bevel.compile(model, "cleanup | fuse_attention | tome(r=1)", example_inputs=example)
    assert merged.report["tome"].status == "applied" and merged.report["tome"].stats["blocks"] == 2


def test_timm_vit_without_fused_attention_is_fused_and_then_merged():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_heads=4, num_classes=5).eval()
    for block in model.blocks:
        block.attn.fused_attn = False  # q * scale @ k^T, softmax, dropout, @ v
    example = (torch.randn(2, 3, 32, 32, generator=seeded(0)),)
    compiled = bevel.compile(model, "cleanup | fuse_attention | tome(r=2)", example_inputs=example)
    assert compiled.report["fuse_attention"].stats["fused"] == 2
    assert compiled.report["tome"].stats["blocks"] == 2
    exact = bevel.compile(model, "cleanup | fuse_attention", example_inputs=example)
    fresh = torch.randn(3, 3, 32, 32, generator=seeded(1))
    with torch.no_grad():
        assert close(exact(fresh), model(fresh))


def test_minilm_in_eager_attention_is_fused_exactly_and_its_heads_become_prunable(minilm_inputs):
    # a fresh copy of the real model, switched to HF's written-out ("eager") attention
    model = minilm_model.load_minilm()
    model.set_attn_implementation("eager")
    _, batches = minilm_model.held_out_batches(64, batch_size=32)
    reference = minilm_model.sentence_embeddings(model, batches)
    compiled = bevel.compile(model, "cleanup | fuse_attention", example_inputs=minilm_inputs)
    assert compiled.report["fuse_attention"].stats["fused"] == 6
    assert not compiled.report["fuse_attention"].notes
    cosine = F.cosine_similarity(minilm_model.sentence_embeddings(compiled, batches), reference)
    print(f"MiniLM eager attention fused: min cosine {float(cosine.min()):.7f} over 64 held-out sentences")
    assert float(cosine.min()) >= 0.99999
    heads = bevel.compile(model, 'cleanup | fuse_attention | prune.structured(target="heads", ratio=0.25)',
                          example_inputs=minilm_inputs)
    assert len(heads.report["prune.structured"].stats["groups"]) == 6


def test_a_model_without_attention_is_left_unchanged_and_params_are_refused():
    model = nn.Sequential(nn.Linear(8, 8), nn.Softmax(dim=-1), nn.Linear(8, 2)).eval()  # a softmax, no attention
    graph, result = fused(model, (torch.randn(3, 8),))
    assert not result.changed and any("nothing changed" in note for note in result.notes)
    with pytest.raises(ParamError, match="pass 'fuse_attention' has no parameter 'scale'"):
        bevel.Pipeline("fuse_attention(scale=0.5)")


class Variant(nn.Module):
    """Written-out attention in a form that is not scaled_dot_product_attention's."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.qkv = nn.Linear(16, 48)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1)
        if self.form == "scaled_after_mask":  # the factor scales the mask too
            scores = (scores + mask) * 0.125
        elif self.form == "boolean_mask":  # adds 0 or 1, where attention would keep or drop
            scores = scores + (mask > 0)
        elif self.form == "mask_with_factor":
            scores = torch.add(scores, mask, alpha=3.0)
        else:  # "wider_mask": the mask's batch of 2 broadcasts a query batch of 1
            q, k, v = q[:1], k[:1], v[:1]
            scores = q @ k.transpose(-2, -1) + mask
        return scores.softmax(dim=-1) @ v


@pytest.mark.parametrize("form", ["scaled_after_mask", "boolean_mask", "mask_with_factor", "wider_mask"])
def test_chains_that_are_not_attention_as_the_fused_op_computes_it_are_left_alone(form):
    torch.manual_seed(0)
    model = Variant(form).eval()
    example = (torch.randn(2, 5, 16, generator=seeded(0)), torch.randn(2, 1, 5, 5, generator=seeded(1)))
    graph, result = fused(model, example)
    assert not result.changed, result.notes
    assert any(note.startswith("left alone: softmax") for note in result.notes)
    with torch.no_grad():
        assert torch.equal(graph(*example), model(*example))
