"""``layer_skip.static`` on random HF Llama, GPT-2 and BERT configs and on a toy stack of blocks.

Differentials: with n=0 the graph is unchanged (outputs within 1e-5 of eager: float rounding only);
a block made an exact identity (its output projections zeroed) is ranked most redundant, and
removing it leaves every output within 1e-5; a block that is exactly a per-channel affine map is
removed without loss only with ``compensate``, which fits that map (least squares, 1e-5).
"""

from __future__ import annotations

import collections

import pytest
import torch

import bevel
from bevel.ir.decoder import attention_sites
from bevel.ir.graph import Graph
from tests.decoders import padded_prompts, positions_of, small_causal_lm


def _identity_block(model, index):
    """Zero the projections that write into the residual stream: the block returns its input."""
    layer = (model.model.layers if hasattr(model, "model") else model.transformer.h)[index]
    with torch.no_grad():
        if hasattr(layer, "self_attn"):
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        else:
            for projection in (layer.attn.c_proj, layer.mlp.c_proj):
                projection.weight.zero_()
                projection.bias.zero_()
    return model


@pytest.fixture(scope="module")
def calibration():
    return [padded_prompts([6, 4, 8], seed=s) for s in range(3)]


def test_n_zero_changes_nothing(calibration):
    model = small_causal_lm("llama", layers=3)
    ids, mask = calibration[0]
    cm = bevel.compile(model, "layer_skip.static(n=0)", example_inputs=(ids, mask), calibration=calibration)
    entry = cm.report.passes[0]
    assert entry.status == "no change" and entry.stats["removed"] == []
    eager = model(ids, attention_mask=mask, position_ids=positions_of(mask)).logits
    assert (cm(ids, mask) - eager)[mask.bool()].abs().max().item() < 1e-5


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_an_identity_block_ranks_first_and_goes_without_loss(kind, calibration):
    model = _identity_block(small_causal_lm(kind, layers=4, seed=1), 2)
    ids, mask = calibration[0]
    cm = bevel.compile(model, "layer_skip.static(n=1)", example_inputs=(ids, mask), calibration=calibration)
    entry = cm.report.passes[0]
    assert entry.status == "applied" and entry.stats["removed"] == [2]
    per_block = entry.stats["per_block"]
    assert per_block[2]["rank"] == 1 and per_block[2]["cosine"] == pytest.approx(1.0, abs=1e-9)
    assert per_block[2]["rel_l2"] == pytest.approx(0.0, abs=1e-9)
    assert per_block[2]["cosine_without_it"] == pytest.approx(1.0, abs=1e-6)
    # the removed layer's cache is passed through and not compared; the rest is exact
    assert ["present_key_2", "present_value_2"] == entry.fidelity.not_compared
    fresh_ids, fresh_mask = padded_prompts([9, 2], seed=7)
    eager = model(fresh_ids, attention_mask=fresh_mask, position_ids=positions_of(fresh_mask)).logits
    assert (cm(fresh_ids, fresh_mask) - eager)[fresh_mask.bool()].abs().max().item() < 1e-5
    assert [s.layer for s in attention_sites(Graph(cm.graph_module, cm.example_inputs))] == [0, 1, 3]
    assert entry.after.params < entry.before.params
    # greedy generation with the block gone equals HF's generation with it in place
    expected = model.generate(fresh_ids, attention_mask=fresh_mask, max_new_tokens=8, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    assert torch.equal(cm.generate(fresh_ids, 8, attention_mask=fresh_mask, eos_token_id=None), expected)


def test_max_drop_removes_only_what_fits(calibration):
    model = _identity_block(small_causal_lm("llama", layers=4, seed=2), 1)
    ids, mask = calibration[0]
    cm = bevel.compile(model, "layer_skip.static(n=none, max_drop=0.000001)", example_inputs=(ids, mask),
                       calibration=calibration)
    assert cm.report.passes[0].stats["removed"] == [1]  # the other blocks all change the outputs


def test_explicit_layers_and_the_l2_ranking(calibration):
    model = _identity_block(small_causal_lm("llama", layers=4, seed=3), 3)
    ids, mask = calibration[0]
    cm = bevel.compile(model, "layer_skip.static(layers=[0, 1], score=\"l2\", probe=false)",
                       example_inputs=(ids, mask), calibration=calibration)
    entry = cm.report.passes[0]
    assert entry.stats["removed"] == [0, 1] and entry.stats["ranking"][0] == 3
    assert "cosine_without_it" not in entry.stats["per_block"][0]


class AffineBlock(torch.nn.Module):
    """A residual block whose branch is affine, so the whole block is an affine map of its input."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.rand(width) + 0.5)
        self.shift = torch.nn.Parameter(torch.randn(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (x * self.scale + self.shift)


class MlpBlock(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(width, 2 * width), torch.nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class Stack(torch.nn.Module):
    """Blocks in a ModuleList: MLP, affine, MLP, MLP."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList([MlpBlock(width), AffineBlock(width), MlpBlock(width), MlpBlock(width)])
        self.head = torch.nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_compensation_replaces_an_affine_block_exactly():
    model = Stack().eval()
    batches = [(torch.randn(8, 5, 16),) for _ in range(3)]
    fresh = torch.randn(4, 7, 16)
    plain = bevel.compile(model, "layer_skip.static(layers=[1])", calibration=batches)
    fitted = bevel.compile(model, "layer_skip.static(layers=[1], compensate=true)", calibration=batches)
    with torch.no_grad():
        expected = model(fresh)
    assert (fitted(fresh) - expected).abs().max().item() < 1e-5
    assert (plain(fresh) - expected).abs().max().item() > 0.05
    assert fitted.report.passes[0].stats["compensated"] is True


class PlainLayers(torch.nn.Module):
    """Numbered layers that are not residual blocks: a Linear and ReLU stack in an nn.Sequential."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers = [m for _ in range(3) for m in (torch.nn.Linear(width, width), torch.nn.ReLU())]
        self.body = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_numbered_layers_that_are_not_residual_blocks_are_not_removed():
    """Dropping a Linear or a ReLU of a plain stack is not skipping a layer of a residual stream: every
    "block" is named as not residual and nothing changes."""
    model = PlainLayers().eval()
    batches = [(torch.randn(8, 16),) for _ in range(2)]
    cm = bevel.compile(model, "layer_skip.static(n=1)", calibration=batches)
    entry = cm.report.passes[0]
    assert entry.status == "no change"
    assert len(entry.notes) == 6 and all("is not a residual block" in note for note in entry.notes)
    fresh = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.equal(cm.graph_module(fresh), model(fresh))  # the graph: cm may run its linears on oneDNN


class SequentialMlp(torch.nn.Module):
    """A residual block whose MLP is a numbered Sequential with dropouts (torchvision's MLPBlock)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.GELU(), torch.nn.Dropout(0.1),
                                       torch.nn.Linear(2 * width, width), torch.nn.Dropout(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class StemNamedStack(torch.nn.Module):
    """Blocks named after a stem, as torchvision names its encoder layers (``layers.encoder_layer_2``)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.Sequential(collections.OrderedDict(
            (f"encoder_layer_{i}", SequentialMlp(width)) for i in range(3)))
        self.head = torch.nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(x))


def test_blocks_named_after_a_stem_are_the_blocks_not_the_dropouts_inside_them():
    """The stem-named layers were not seen as a list, so the MLP's Sequential was taken for the blocks,
    and its eval-mode Dropout (which adds nothing to the stream) was "removed", status applied."""
    model = StemNamedStack().eval()
    batches = [(torch.randn(8, 5, 16),) for _ in range(2)]
    cm = bevel.compile(model, "layer_skip.static(layers=[1])", calibration=batches)
    entry = cm.report.passes[0]
    assert entry.status == "applied" and entry.stats["removed"] == [1]
    assert any("(layers.encoder_layer_1)" in note for note in entry.notes)
    fresh = torch.randn(4, 7, 16)
    with torch.no_grad():
        expected = model.head(model.layers.encoder_layer_2(model.layers.encoder_layer_0(fresh)))
    assert (cm(fresh) - expected).abs().max().item() < 1e-5
    # a lone MLP Sequential has no block to remove: its dropouts are no residual blocks either
    lone = torch.nn.Sequential(SequentialMlp(16).mlp).eval()
    entry = bevel.compile(lone, "layer_skip.static(n=1)", calibration=batches).report.passes[0]
    assert entry.status == "no change"
    assert [note.startswith(f"block {i} cannot be removed") for i, note in enumerate(entry.notes)] == [True] * 5
    assert "0.2 is not a residual block: its output dropout is not its input gelu" in entry.notes[2]


class DictLayer(torch.nn.Module):
    """Residual layers kept as a ModuleList of ModuleDicts, the residual adds written in the parent's
    forward: ``layers.0`` itself is never called, only ``layers.0.attn`` and ``layers.0.ff``."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        def feed_forward() -> torch.nn.Module:
            return torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.GELU(),
                                       torch.nn.Linear(2 * width, width))

        layers = [torch.nn.ModuleDict(dict(mix=torch.nn.Linear(width, width), ff=feed_forward())) for _ in range(3)]
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer["mix"](x)
            x = x + layer["ff"](x)
        return x


def test_a_module_dict_layer_is_one_block_not_its_inner_sequential():
    """The blocks are ``layers.N`` (not ``layers.0.ff``, whose GELU would otherwise be "removed"); their
    residual adds run outside them, so each is named as not removable and nothing changes."""
    model = DictLayer().eval()
    batches = [(torch.randn(8, 16),) for _ in range(2)]
    cm = bevel.compile(model, "layer_skip.static(n=1)", calibration=batches)
    entry = cm.report.passes[0]
    assert entry.status == "no change"
    assert [note.split(":")[0] for note in entry.notes] == [f"block {i} cannot be removed" for i in range(3)]
    assert all(f"layers.{i} hands" in note for i, note in enumerate(entry.notes))


def test_a_model_without_repeated_blocks_is_left_unchanged():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    cm = bevel.compile(model, "layer_skip.static(n=1)", example_inputs=(torch.randn(3, 8),))
    entry = cm.report.passes[0]
    assert entry.status == "no change" and "no repeated blocks" in entry.notes[0]


@pytest.fixture(scope="module")
def four_layers(calibration):
    """A 4-layer llama captured once for the tests of counts it cannot take."""
    return bevel.capture(small_causal_lm("llama", layers=4), calibration[0])


@pytest.mark.parametrize("pipeline, message", [
    ("layer_skip.static(n=4)", "n=4.*has 4 repeated blocks; n must be smaller"),
    ("layer_skip.static(n=9)", "n=9"),
    ("layer_skip.static(layers=[0, 4])", "layers=\\[0, 4\\]\\): give distinct block indices in \\[0, 4\\)"),
    ("layer_skip.static(layers=[1, 1])", "distinct block indices"),
    ("layer_skip.static(layers=[0, 1, 2, 3])", "fewer than the 4 blocks"),
])
def test_counts_the_graph_cannot_take_fail_the_pass_with_a_reason(pipeline, message, four_layers):
    cm = bevel.compile(four_layers, pipeline)
    entry = cm.report.passes[0]
    assert entry.status == "failed"
    assert __import__("re").search(message, entry.reason), entry.reason


@pytest.mark.parametrize("text, message", [("layer_skip.static(n=-1)", "n must be in \\[0, inf\\)"),
                                           ("layer_skip.static(score=\"angle\")", "'angle' is not one of"),
                                           ("layer_skip.static(max_drop=3)", "max_drop must be in"),
                                           ("layer_skip.static(layers=[])", "give one or more block indices"),
                                           ("layer_skip.static(layers=[-1])", "give one or more block indices"),
                                           ("layer_skip.static(layers=[1], n=2)",
                                            "not both; got layers=\\[1\\] and n=2"),
                                           ("layer_skip.static(layers=[1], max_drop=0.1)",
                                            "not both; got layers=\\[1\\] and max_drop=0.1")])
def test_bad_params_are_refused_before_any_work(text, message):
    with pytest.raises(bevel.PipelineError, match=message):
        bevel.compile(small_causal_lm("llama"), text, example_inputs=(torch.randint(3, 300, (2, 4)),))


def test_an_opt_layer_whose_ffn_runs_on_flattened_rows_goes_as_if_deleted():
    """OPT runs its FFN on ``[batch * tokens, hidden]`` rows and views the sum back: its layers were
    taken for non-residual ones. Removing layer 1 (uncompensated) gives the logits of the same model
    with that layer deleted (1e-5: float rounding of the captured ops)."""
    import copy

    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(num_hidden_layers=3, hidden_size=32, ffn_dim=64, num_attention_heads=2, vocab_size=100,
                       word_embed_proj_dim=32, max_position_embeddings=64)
    model = OPTForCausalLM(config).eval()
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    # the plain forward (tokens -> logits), to compare with HF's on a fresh prompt
    cm = bevel.compile(model, "layer_skip.static(layers=[1], compensate=false)", example_inputs=(ids,),
                       decoder=False)
    entry = cm.report.passes[0]
    assert entry.status == "applied" and entry.stats["removed"] == [1], entry.notes
    shorter = copy.deepcopy(model)
    del shorter.model.decoder.layers[1]
    fresh = torch.randint(3, 100, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, full = shorter(fresh).logits, model(fresh).logits
        logits = cm(fresh)
    logits = logits if isinstance(logits, torch.Tensor) else logits[0]
    assert (logits - expected).abs().max().item() < 1e-5
    assert (logits - full).abs().max().item() > 0.1  # the layer did something


def test_an_encoder_block_goes_too():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                                vocab_size=100)).eval()
    ids = torch.randint(0, 100, (2, 6))
    cm = bevel.compile(bert, "layer_skip.static(n=1)", example_inputs=(ids,))
    entry = cm.report.passes[0]
    assert entry.status == "applied" and len(entry.stats["removed"]) == 1
    assert entry.after.params < entry.before.params


def test_an_encoders_padded_tokens_change_neither_the_scores_nor_the_probe():
    """Outputs at an encoder's padded positions mean nothing (its attention never reads them): the
    blocks' scores and the fidelity of removing each must come from the real tokens alone, so
    calibration batches that differ only in their padded tokens' ids give the same report."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                                vocab_size=100)).eval()
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(10) < torch.tensor([10, 6, 3, 7])[:, None]).long()
    ids = torch.randint(1, 100, (4, 10), generator=g)
    other = torch.where(mask.bool(), ids, torch.randint(1, 100, (4, 10), generator=g))
    captured = bevel.capture(bert, (ids, mask))
    reports = [bevel.compile(captured, "layer_skip.static(n=1)", calibration=[(batch, mask)]).report.passes[0]
               .stats["per_block"] for batch in (ids, other)]
    for block, figures in reports[0].items():
        for key in ("cosine", "rel_l2", "cosine_without_it"):
            assert figures[key] == pytest.approx(reports[1][block][key], abs=2e-6), (block, key)
