"""Shared pieces of the token reducing pass tests: running a planner eagerly, small captured models
(a random HF BERT with padding, a random timm ViT), and applying a pass to a copy of a capture."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from bevel.compiler.captured import copy_model
from bevel.ir import capture
from bevel.passes import PassContext, get_pass

aten = torch.ops.aten


class EagerInserter:
    """Runs each op a planner asks for at once, on tensors, instead of inserting a node: the plan is
    then checked with the very code the graph holds."""

    graph = SimpleNamespace(shape=lambda tensor: tuple(tensor.shape))

    def __call__(self, target, *args, **kwargs):
        """The op's result."""
        return target(*args, **kwargs)


def block_of(query: torch.Tensor, keys: torch.Tensor, scale: float | None = None) -> SimpleNamespace:
    """A stand-in for an AttentionBlock: what the planners read of it."""
    kwargs = {} if scale is None else {"scale": scale}
    attention = SimpleNamespace(target=aten.scaled_dot_product_attention.default, args=(query, keys, keys),
                                kwargs=kwargs)
    return SimpleNamespace(attention=attention, keys=keys)


def padded_ids(batch: int, length: int, real: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids and a padding mask with ``real[i]`` real tokens in row ``i``."""
    ids = torch.randint(1, 1000, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(length) < torch.tensor(real)[:, None]).long()
    return ids * mask, mask


def captured(model: torch.nn.Module, example: tuple) -> SimpleNamespace:
    """The model, its example inputs and its captured graph (dynamic batch and length)."""
    return SimpleNamespace(model=model, example=example, graph=capture(copy_model(model), example))


def small_bert() -> SimpleNamespace:
    """A random HF BERT (2 layers, hidden 64) on padded inputs (batch 3, length 12)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    return captured(BertModel(config).eval(), padded_ids(3, 12, [12, 8, 5], seed=1))


def small_vit() -> SimpleNamespace:
    """A random timm ViT-Tiny/16 at 224 with 4 of its 12 blocks (for speed), 10 classes, batch 2."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, depth=4).eval()
    return captured(model, (torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)),))


def apply_pass(model: SimpleNamespace, name: str, **params):
    """(rewritten copy of ``model.graph``, the pass result)."""
    graph = model.graph.copy()
    ctx = PassContext(calibration=[model.example], example_inputs=model.example)
    return graph, get_pass(name)(**params).run(graph, ctx)


def assert_loads_identical(compiled, tmp_path) -> None:
    """``compiled`` (a BERT taking ids and a padding mask) saved and loaded gives identical outputs
    on a padded batch of another shape."""
    import bevel

    compiled.save(str(tmp_path / "artifact"))
    loaded = bevel.load(str(tmp_path / "artifact"))
    ids, mask = padded_ids(4, 10, [10, 2, 3, 4], seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask)[0], compiled(ids, mask)[0], rtol=0, atol=0)


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The smallest cosine between matching rows."""
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())


def onnx_round_trip(module: torch.nn.Module, example: tuple, dynamic_shapes: tuple, fresh: tuple, path) -> list:
    """``module`` exported to ONNX with dynamic shapes, run by ONNX Runtime on ``fresh`` inputs."""
    import onnxruntime as ort

    torch.onnx.export(module.eval(), example, dynamo=True, dynamic_shapes=dynamic_shapes).save(str(path))
    session = ort.InferenceSession(str(path))
    return session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), fresh)})
