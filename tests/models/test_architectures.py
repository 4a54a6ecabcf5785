"""Other architectures through compile, save/load and ONNX (random weights, small configs):
a timm ViT, GPT-2 (its linears are HF Conv1D, i.e. addmm), Falcon (its linears are ``x @ W.T``),
Llama (rotary embeddings under a higher-order op) and a T5 encoder (relative position bias); the causal
LMs are captured as decoders, whose ONNX model takes the step inputs. Differential tolerance: cleanup is exact (1e-5);
pruning is checked by its count."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch

import bevel
from bevel.ir.decoder import prefill_inputs
from bevel.runtime.compiled_decoder import CompiledDecoder
from tests.models_zoo import seeded


def vit():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10)
    example, fresh = torch.randn(2, 3, 32, 32, generator=seeded(1)), torch.randn(5, 3, 32, 32, generator=seeded(2))
    return model.eval(), (example,), (fresh,)


def gpt2(use_cache=False):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, use_cache=use_cache,
                        bos_token_id=0, eos_token_id=0)
    ids = torch.randint(0, 128, (2, 9), generator=seeded(3))
    return GPT2LMHeadModel(config).eval(), (ids,), (torch.randint(0, 128, (3, 13), generator=seeded(4)),)


def falcon():
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    # multi-query attention, parallel attention and MLP, as the Falcon 7B config
    config = FalconConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128, use_cache=False,
                          bos_token_id=0, eos_token_id=0)
    ids = torch.randint(0, 128, (2, 9), generator=seeded(9))
    return FalconForCausalLM(config).eval(), (ids,), (torch.randint(0, 128, (3, 13), generator=seeded(10)),)


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, use_cache=False, bos_token_id=0, eos_token_id=0)
    ids = torch.randint(0, 128, (2, 9), generator=seeded(5))
    return LlamaForCausalLM(config).eval(), (ids,), (torch.randint(0, 128, (3, 13), generator=seeded(6)),)


def t5_encoder():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(num_layers=2, d_model=64, d_kv=16, num_heads=4, d_ff=128, vocab_size=128)
    ids, mask = torch.randint(0, 128, (2, 9), generator=seeded(7)), torch.ones(2, 9, dtype=torch.long)
    fresh_ids, fresh_mask = torch.randint(0, 128, (3, 13), generator=seeded(8)), torch.ones(3, 13, dtype=torch.long)
    fresh_mask[0, 6:] = 0
    return T5EncoderModel(config).eval(), (ids, mask), (fresh_ids, fresh_mask)


def main_output(out):
    return out if isinstance(out, torch.Tensor) else out[0]  # logits, or an encoder's last hidden state


# T5 (relative position bias, `transpose(1, 2).contiguous().view(...)` after attention) once failed
# only in the ONNX export
@pytest.mark.parametrize("build", [vit, gpt2, falcon, llama, t5_encoder],
                         ids=["vit", "gpt2", "falcon", "llama", "t5_encoder"])
def test_compile_save_load_and_onnx(build, tmp_path):
    model, example, fresh = build()
    cm = bevel.compile(model, "cleanup | prune.magnitude(sparsity=0.3)", example_inputs=example)
    assert [p.status for p in cm.report.passes] == ["applied", "applied"], [p.reason for p in cm.report.passes]
    # 30% of the weights the pass prunes; GPT-2's output layer is tied to its embedding and stays dense
    assert cm.report["prune.magnitude"].stats["sparsity"] == pytest.approx(0.3, abs=0.01)
    pruned = cm.report["prune.magnitude"].stats["per_layer_sparsity"]
    weights = {n: w for n, w in cm.graph_module.named_parameters() if n in pruned}
    zeros = sum(int((w == 0).sum()) for w in weights.values()) / sum(w.numel() for w in weights.values())
    assert zeros == pytest.approx(0.3, abs=0.01)
    if build is falcon:  # cleanup made its 4 products per layer Linear layers, which the pass prunes
        assert cm.report["cleanup"].stats["linears_from_matmul"] == 8 and len(pruned) == 8
    if build in (gpt2, falcon):
        assert "model.lm_head.weight" not in pruned and "model.transformer.wte.weight" not in pruned
        assert any("tied" in note for note in cm.report["prune.magnitude"].notes)

    exact = bevel.compile(model, "cleanup", example_inputs=example)
    with torch.no_grad():
        assert (main_output(exact(*fresh)) - main_output(model(*fresh))).abs().max() <= 1e-5

    out = main_output(cm(*fresh))
    loaded = bevel.load(cm.save(str(tmp_path / "artifact")))
    assert torch.equal(main_output(loaded(*fresh)), out)

    path = cm.export_onnx(str(tmp_path / "model.onnx"))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    inputs = prefill_inputs(cm.spec, fresh[0]) if isinstance(cm, CompiledDecoder) else fresh
    (first, *_) = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)})
    # float32 with another summation order in onnxruntime; a wrong op would be off by orders more
    assert abs(first - out.numpy()).max() <= 1e-4


def test_falcon_layers_are_quantized_and_pruned_after_cleanup_and_named_without_it():
    model, example, fresh = falcon()
    for name in ("quantize.int8_weight", "prune.structured"):  # without cleanup: nothing done, and why
        entry = bevel.compile(model, name, example_inputs=example).report[name]
        assert entry.status == "no change"
        assert any(note.startswith("8 layers are written as a matrix product") and "`cleanup` earlier" in note
                   for note in entry.notes)

    cm = bevel.compile(model, 'cleanup | prune.structured(target="mlp", ratio=0.5) | quantize.int8_weight',
                       example_inputs=example)
    assert [p.status for p in cm.report.passes] == ["applied"] * 3
    groups = cm.report["prune.structured"].stats["groups"]
    assert len(groups) == 2 and all(g["units"][1] == g["units"][0] // 2 for g in groups.values())  # the FFNs
    assert cm.report["quantize.int8_weight"].stats["quantized"] == 8  # all but the output layer tied to the table
    tokens = cm.generate(fresh[0], max_new_tokens=5, eos_token_id=None)
    assert tokens.shape == (3, 18) and torch.equal(tokens[:, :13], fresh[0])


def test_a_backbone_that_would_return_its_kv_cache_is_captured_without_it():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    # the bare GPT-2 stack is no causal LM (no head, no generate); a cache object is no graph output, so
    # the copy captured is told use_cache=False, and the user's model keeps its config
    model = GPT2Model(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64)).eval()
    assert model.config.use_cache
    cm = bevel.compile(model, "cleanup", example_inputs=(torch.randint(0, 128, (2, 9), generator=seeded(3)),))
    fresh = torch.randint(0, 128, (3, 11), generator=seeded(4))
    with torch.no_grad():
        expected = model(fresh).last_hidden_state
        assert (cm(fresh).last_hidden_state - expected).abs().max() <= 1e-5  # cleanup is exact (module docstring)
    assert model.config.use_cache


def test_a_causal_lm_with_its_cache_on_is_captured_as_a_decoder():
    model, example, fresh = gpt2(use_cache=True)
    cm = bevel.compile(model, "cleanup", example_inputs=example)
    assert isinstance(cm, CompiledDecoder)
    with torch.no_grad():
        assert (cm(*fresh) - model(*fresh).logits).abs().max() <= 1e-5
