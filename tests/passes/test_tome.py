"""tome on random models: HF BERT with padded rows, timm, torchvision and HF ViTs, and an encoder of
nn.MultiheadAttention.

Two differentials are exact in real arithmetic, so they are checked at 1e-5 (float32 roundings of
a few hundred sums and of log(2) in the mask):
- merging a token into an identical one, with proportional attention (log of the size in the
  mask), changes no output: attention to one key of size 2 equals attention to two equal keys, and
  every other layer acts on tokens one by one;
- a row whose removals are all padding (a short sentence batched with a long one) keeps the
  outputs of its real tokens: padding was masked before and is masked (or gone) after.
``r=0`` must leave the graph alone, and the compiled model must equal the eager one at 1e-5 (the
difference between the captured ops and eager PyTorch).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bevel
from bevel.errors import ParamError
from tests.models_zoo import MaskedEncoder, seeded


class Block(nn.Module):
    """A pre-norm transformer block with nn.MultiheadAttention (no positional information)."""

    def __init__(self, dim: int, need_weights: bool) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.need_weights = need_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=self.need_weights)[0]
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    """Blocks of nn.MultiheadAttention; returns the tokens and a head on the first one."""

    def __init__(self, dim: int = 32, depth: int = 3, need_weights: bool = False) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[Block(dim, need_weights) for _ in range(depth)])
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.blocks(x)
        return x, self.head(x[:, 0])


def encoder(need_weights: bool = False):
    torch.manual_seed(0)
    return Encoder(need_weights=need_weights).eval(), lambda g, b=2, n=20: (torch.randn(b, n, 32, generator=g),)


def masked_encoder():
    torch.manual_seed(0)

    def inputs(g, b=3, n=12):
        mask = torch.ones(b, n, dtype=torch.long)
        mask[1:, n // 2:] = 0
        return torch.randn(b, n, 32, generator=g), mask

    return MaskedEncoder().eval(), inputs


def bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)

    def inputs(g, b=3, n=12):
        mask = torch.ones(b, n, dtype=torch.long)
        mask[1:, n // 2:] = 0  # rows after the first are padded from the middle
        return torch.randint(0, 120, (b, n), generator=g), mask

    return BertModel(config).eval(), inputs


def vit(depth: int = 2):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=depth,
                              num_heads=4, num_classes=5)
    return model.eval(), lambda g, b=2: (torch.randn(b, 3, 32, 32, generator=g),)


def torchvision_vit():
    """torchvision's ViT: nn.MultiheadAttention (need_weights=False) on a fixed count of 17 tokens, which
    its graph multiplies into sizes (batch * 17 rows before the output projection)."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=5)
    nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision starts the head at zero
    return model.eval(), lambda g, b=2: (torch.randn(b, 3, 32, 32, generator=g),)


def hf_vit():
    """HF transformers' ViT: its attention gets an all-true mask built from sizes, which cleanup drops."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8)
    return ViTModel(config).eval(), lambda g, b=2: (torch.randn(b, 3, 32, 32, generator=g),)


# masked: padding dropped before a block that reads the input directly (it once failed there)
MODELS = {"mha": encoder, "bert": bert, "vit": vit, "masked": masked_encoder, "torchvision_vit": torchvision_vit,
          "hf_vit": hf_vit}
IMAGE_MODELS = ("vit", "torchvision_vit", "hf_vit")


def outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return list(out.values()) if hasattr(out, "values") else list(out)


def fresh_inputs(name, make_inputs):
    """Inputs of another batch size (and, where the model allows, another length) than the example's."""
    g = seeded(9)
    return make_inputs(g, 4) if name in IMAGE_MODELS else make_inputs(g, 4, 16)


@pytest.mark.parametrize("name", list(MODELS))
def test_r_zero_changes_nothing(name):
    model, make_inputs = MODELS[name]()
    compiled = bevel.compile(model, "tome(r=0)", example_inputs=make_inputs(seeded(0)))
    assert compiled.report["tome"].status == "no change"
    fresh = fresh_inputs(name, make_inputs)
    with torch.no_grad():
        for got, want in zip(outputs(compiled(*fresh)), outputs(model(*fresh))):
            assert (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize("name", list(MODELS))
def test_merged_model_runs_on_other_shapes_and_keeps_output_shapes(name):
    model, make_inputs = MODELS[name]()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = bevel.compile(model, "cleanup | tome(r=2)", example_inputs=make_inputs(seeded(0)))
    entry = compiled.report["tome"]
    assert entry.status == "applied", entry.reason
    tokens = entry.stats["tokens"]
    print(f"{name}: tokens per block at the example size {tokens}, notes {entry.notes}")
    assert tokens[-1] < tokens[0]
    fresh = fresh_inputs(name, make_inputs)
    with torch.no_grad():
        got, want = outputs(compiled(*fresh)), outputs(model(*fresh))
    assert [g.shape for g in got] == [w.shape for w in want]
    assert all(torch.isfinite(g).all() for g in got)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), "the user's model changed"


def test_merging_identical_tokens_changes_no_output():
    model, _ = encoder()
    g = seeded(3)
    x = torch.randn(2, 21, 32, generator=g)
    x[:, 2:21:2] = x[:, 1:20:2]  # tokens 1 and 2, 3 and 4, ... are equal: 10 pairs, one of each side
    compiled = bevel.compile(model, "tome(r=3, protect=1)", example_inputs=(x,))
    assert compiled.report["tome"].stats["tokens"] == [21, 18, 15, 12]  # 9 merges, all of twins
    y = torch.randn(3, 21, 32, generator=g)
    y[:, 2:21:2] = y[:, 1:20:2]
    with torch.no_grad():
        for got, want in zip(compiled(y), model(y)):
            assert got.shape == want.shape
            assert (got - want).abs().max() <= 1e-5


def test_merging_identical_patches_of_a_torchvision_vit_changes_no_output():
    model, _ = torchvision_vit()
    nn.init.zeros_(model.encoder.pos_embedding)  # so that equal patches are equal tokens
    g = seeded(5)

    def twins(batch: int) -> torch.Tensor:
        """Images whose 8x8 patches are equal in pairs along each row (tokens 1 and 2, 3 and 4, ...)."""
        x = torch.randn(batch, 3, 32, 32, generator=g)
        x[..., 8:16], x[..., 24:32] = x[..., 0:8], x[..., 16:24]
        return x

    compiled = bevel.compile(model, "tome(r=3)", example_inputs=(twins(2),))
    assert compiled.report["tome"].stats["tokens"] == [17, 14, 11]  # 6 merges, all of twins
    fresh = twins(3)
    with torch.no_grad():
        assert (compiled(fresh) - model(fresh)).abs().max() <= 1e-5


def test_a_mask_built_from_sizes_alone_points_to_cleanup():
    model, make_inputs = hf_vit()
    compiled = bevel.compile(model, "tome(r=2)", example_inputs=make_inputs(seeded(0)))
    entry = compiled.report["tome"]
    assert entry.status == "no change"
    assert any("reads no input" in note and "`cleanup` earlier in the pipeline" in note for note in entry.notes)


def test_a_mask_built_from_symbolic_sizes_points_to_a_static_capture():
    """DINOv2 sizes its all-true mask by the patch count, which a dynamic capture keeps symbolic: cleanup
    cannot show that it masks nothing at every size, and the note says how to make it a constant."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                     image_size=32, patch_size=8)).eval()
    example = (torch.randn(2, 3, 32, 32, generator=seeded(0)),)
    entry = bevel.compile(model, "cleanup | tome(r=2)", example_inputs=example).report["tome"]
    assert entry.status == "no change"
    assert any("input sizes the capture keeps symbolic" in note and 'dynamic_shapes="static"' in note
               for note in entry.notes), entry.notes
    static = bevel.compile(model, "cleanup | tome(r=2)", example_inputs=example, dynamic_shapes="static")
    assert static.report["tome"].stats["tokens"] == [17, 15, 13]


def test_a_static_capture_whose_token_count_equals_another_size_is_left_unchanged_and_named():
    # captured with static shapes, sizes are numbers: 8 tokens and BERT's head dim of 8 cannot be told apart
    model, make_inputs = bert()
    for tokens, status in ((8, "no change"), (12, "applied")):
        inputs = make_inputs(seeded(0), n=tokens)
        compiled = bevel.compile(model, "cleanup | tome(r=2)", example_inputs=inputs, dynamic_shapes="static")
        entry = compiled.report["tome"]
        assert entry.status == status, (tokens, entry.status, entry.reason)
        assert any("equals the head dim" in note for note in entry.notes) == (status == "no change")
        with torch.no_grad():
            assert compiled(*inputs)[0].shape == model(*inputs)[0].shape


def test_a_row_that_loses_only_padding_keeps_its_outputs():
    model, _ = bert()
    g = seeded(4)
    ids = torch.randint(0, 120, (2, 24), generator=g)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 8:] = 0  # 16 padded positions: more than the 2 blocks x r=4 removals
    compiled = bevel.compile(model, "cleanup | tome(r=4)", example_inputs=(ids, mask))
    notes = " ".join(compiled.report["tome"].notes)
    assert "padding (input 'attention_mask')" in notes
    with torch.no_grad():
        got, want = compiled(ids, mask), model(ids, mask)
    real = mask[1].bool()
    assert (got["last_hidden_state"][1, real] - want.last_hidden_state[1, real]).abs().max() <= 1e-5
    assert (got["pooler_output"][1] - want.pooler_output[1]).abs().max() <= 1e-5
    # the long row did merge real tokens
    assert (got["last_hidden_state"][0] - want.last_hidden_state[0]).abs().max() > 1e-3


def test_schedules_and_per_block_lists():
    model, make_inputs = vit()
    example = make_inputs(seeded(0))
    decreasing = bevel.compile(model, 'tome(r=[3, "decreasing"])', example_inputs=example)
    assert decreasing.report["tome"].stats["r"] == [6, 0]
    listed = bevel.compile(model, "tome(r=[1, 2])", example_inputs=example)
    assert listed.report["tome"].stats["tokens"] == [17, 16, 14]


def test_r_above_half_the_tokens_is_clamped_and_reported():
    model, make_inputs = vit()
    compiled = bevel.compile(model, "tome(r=100)", example_inputs=make_inputs(seeded(0)))
    entry = compiled.report["tome"]
    assert entry.stats["tokens"] == [17, 9, 5]  # each merge takes half of the tokens after the CLS
    assert any("r=100 clamped to 8" in note for note in entry.notes), entry.notes
    with torch.no_grad():
        assert compiled(*make_inputs(seeded(1), 3)).shape == (3, 5)


def test_a_model_without_attention_is_left_unchanged():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    compiled = bevel.compile(model, "tome(r=4)", example_inputs=(torch.randn(2, 8),))
    entry = compiled.report["tome"]
    assert entry.status == "no change"
    assert any("no transformer block" in note and "nothing changed" in note for note in entry.notes)


def test_attention_that_is_not_recognized_is_named_and_left_alone():
    model, make_inputs = encoder(need_weights=True)  # attention written as matmul + softmax
    x = make_inputs(seeded(0))
    compiled = bevel.compile(model, "tome(r=2)", example_inputs=x)
    entry = compiled.report["tome"]
    assert entry.status == "no change"
    assert any("left alone: attention 'softmax" in note and "need_weights=True" in note for note in entry.notes)
    with torch.no_grad():
        for got, want in zip(compiled(*x), model(*x)):
            assert (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize("pipeline", ["tome(r=2)", "tome.pitome(r=2)", "token_prune(r=2)", "unpad"])
def test_a_causal_mask_built_with_the_padding_input_is_named_and_left_alone(pipeline):
    """CLIP's text encoder builds its causal mask from the sizes and the padding input; its nodes differ
    from a padding mask's by one comparison of positions. The token passes used to take it for a padding
    mask and replace it: real tokens then saw later ones (max error 2.7 with unpad or token_prune)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            vocab_size=100, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = CLIPTextModel(config).eval()
    ids = torch.randint(3, 100, (3, 12), generator=seeded(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    compiled = bevel.compile(model, f"cleanup | {pipeline}", example_inputs=(ids, mask))
    entry = compiled.report.passes[-1]
    assert entry.status == "no change"
    assert any("left alone: attention 'scaled_dot_product_attention'" in note and "more than a padding mask" in note
               for note in entry.notes), entry.notes
    real = mask.bool()
    with torch.no_grad():
        got, want = compiled(ids, mask)["last_hidden_state"], model(ids, mask).last_hidden_state
    assert (got[real] - want[real]).abs().max() <= 1e-5


@pytest.mark.parametrize("spec,message", [
    ("tome(r=-1)", "r=..."),
    ('tome(r=[8, "fast"])', "schedule"),
    ("tome(protect=-1)", "protect"),
    ('tome(metric="values")', "metric"),
])
def test_bad_parameters_are_refused(spec, message):
    with pytest.raises(ParamError, match=message):
        bevel.Pipeline(spec)


def test_a_list_of_r_of_the_wrong_length_fails_the_pass_and_says_why():
    model, make_inputs = vit()
    compiled = bevel.compile(model, "tome(r=[1, 2, 3])", example_inputs=make_inputs(seeded(0)))
    entry = compiled.report["tome"]
    assert entry.status == "failed"
    assert "3 values given for 2 transformer blocks" in entry.reason


def test_onnx_export_of_a_merged_vit_runs_with_another_batch_and_agrees(tmp_path):
    import onnxruntime as ort

    model, make_inputs = vit()
    compiled = bevel.compile(model, "cleanup | tome(r=3)", example_inputs=make_inputs(seeded(0)))
    session = ort.InferenceSession(compiled.export_onnx(str(tmp_path / "vit.onnx")),
                                   providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        (images,) = make_inputs(seeded(batch), batch)
        (logits,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
        with torch.no_grad():
            assert (torch.from_numpy(logits) - compiled(images)).abs().max() <= 1e-4


def test_the_torch_compile_backend_merges_like_bevel_compile():
    model, make_inputs = vit()
    (x,) = make_inputs(seeded(0))
    backend = torch.compile(model, backend="bevel", options={"passes": "cleanup | tome(r=3)"})
    direct = bevel.compile(model, "cleanup | tome(r=3)", example_inputs=(x,))
    with torch.no_grad():
        got, want, original = backend(x), direct(x), model(x)
    assert torch.equal(got, want)
    assert (got - original).abs().max() > 1e-4  # tokens were merged: not the original model


def test_a_merging_compiled_module_runs_through_inductor(monkeypatch):
    """``torch.compile`` (Inductor) of the CompiledModule, as the GPU benchmark times it: Inductor
    generates code for the ops around bevel's matching and merging ops and calls those as they are
    (their fake implementations give it the merged lengths). The same outputs, up to the order of
    float32 sums in Inductor's fused kernels (1e-5). One block: Inductor compiles C++ for each kernel,
    and a block shows every kind of op a merging model has. The CPU linears are forced onto oneDNN,
    which Inductor lowers only for constant weights: it traced them whenever they were timed faster."""
    from bevel.codegen.cpu_linear import CHOICE_VARIABLE

    monkeypatch.setenv(CHOICE_VARIABLE, "onednn")
    model, make_inputs = vit(depth=1)
    (x,) = make_inputs(seeded(0))
    compiled = bevel.compile(model, "cleanup | tome(r=3)", example_inputs=(x,), dynamic_shapes="static")
    inductor = torch.compile(compiled, fullgraph=True)  # one graph: no part left to eager PyTorch
    (fresh,) = make_inputs(seeded(1))
    with torch.no_grad():
        assert (inductor(fresh) - compiled(fresh)).abs().max() <= 1e-5
