"""Tests for ``export_onnx``: the real MiniLM and small models run in onnxruntime and match the CompiledModule."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.utils._pytree import keystr, tree_flatten_with_path

import bevel
from bevel.errors import ExportError
from bevel.ir.onnx_export import DEFAULT_OPSET
from tests.models_zoo import seeded


def onnx_dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    """A graph input's or output's shape: a dim_param name where the dimension is dynamic, else its size."""
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def run_onnx(path: str, inputs: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = {spec.name: x.numpy() for spec, x in zip(session.get_inputs(), inputs)}
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


def output_fields(outputs) -> dict[str, torch.Tensor]:
    """Output leaves by field name (``.last_hidden_state`` -> ``last_hidden_state``)."""
    return {re.sub(r"\W", "", keystr(path)): value for path, value in tree_flatten_with_path(outputs)[0]}


# -- the real model ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_onnx(minilm_pruned, tmp_path_factory) -> str:
    return minilm_pruned.export_onnx(str(tmp_path_factory.mktemp("onnx") / "model.onnx"))


def test_minilm_runs_in_onnxruntime_and_matches(minilm_pruned, minilm_onnx, fresh_sentences, minilm_inputs):
    assert fresh_sentences[0].shape[0] != minilm_inputs[0].shape[0]
    assert fresh_sentences[0].shape[1] != minilm_inputs[0].shape[1]
    onnx.checker.check_model(minilm_onnx, full_check=True)
    expected = output_fields(minilm_pruned(*fresh_sentences))
    got = run_onnx(minilm_onnx, fresh_sentences)
    assert set(got) == set(expected) == {"last_hidden_state", "pooler_output"}
    for name, value in expected.items():
        assert got[name].shape == tuple(value.shape), name
        error = float(np.abs(got[name] - value.numpy()).max())
        assert error < 1e-4, f"{name}: max abs error {error:.2e} between onnxruntime and the CompiledModule"


def test_minilm_onnx_has_dynamic_axes_and_named_outputs(minilm_pruned, minilm_onnx):
    model = onnx.load(minilm_onnx, load_external_data=False)
    inputs = {i.name: onnx_dims(i) for i in model.graph.input}
    assert list(inputs) == ["input_ids", "attention_mask"]
    for name, dims in inputs.items():
        assert len(dims) == 2 and all(isinstance(d, str) and d for d in dims), (name, dims)
    assert inputs["input_ids"] == ["batch", "sequence"]
    assert inputs["attention_mask"][1] == "sequence"  # one sequence length shared by both inputs

    outputs = {o.name: onnx_dims(o) for o in model.graph.output}
    assert list(outputs) == list(output_fields(minilm_pruned(*minilm_pruned.example_inputs)))
    assert outputs == {"last_hidden_state": ["batch", "sequence", 384], "pooler_output": ["batch", 384]}


def test_minilm_weights_live_beside_the_model(minilm_pruned, minilm_onnx):
    weight_bytes = sum(p.numel() * p.element_size() for p in minilm_pruned.graph_module.parameters())
    data = minilm_onnx + ".data"
    assert os.path.isfile(data)
    assert weight_bytes * 0.99 <= os.path.getsize(data) <= weight_bytes * 1.01
    assert os.path.getsize(minilm_onnx) < 0.05 * weight_bytes


# -- small models ------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class AttentionBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.norm = nn.LayerNorm(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return self.norm(h + self.attn(h, h, h, need_weights=False)[0])


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Give BatchNorm layers non-trivial statistics, so the export of their folding is really tested."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.5, generator=seeded(7))
            module.running_var.uniform_(0.5, 2.0, generator=seeded(8))
    return model


# model, example input (the compile), fresh input (another batch size), the static input dimensions
SMALL_MODELS = {
    "mlp": (MLP, (4, 16), (9, 16), {1: 16}),
    "convnet": (SmallConvNet, (2, 3, 16, 16), (5, 3, 16, 16), {1: 3}),
    "multihead_attention": (AttentionBlock, (2, 6, 8), (3, 6, 8), {2: 8}),
}


@pytest.mark.parametrize("name", list(SMALL_MODELS))
def test_small_models_match_onnxruntime(name, tmp_path):
    build, example_shape, fresh_shape, static = SMALL_MODELS[name]
    torch.manual_seed(0)
    model = randomize_batchnorm(build()).eval()
    compiled = bevel.compile(model, "cleanup", example_inputs=(torch.randn(*example_shape, generator=seeded(1)),))
    path = compiled.export_onnx(str(tmp_path / f"{name}.onnx"))

    (dims,) = [onnx_dims(i) for i in onnx.load(path, load_external_data=False).graph.input]
    assert dims[0] == "batch"
    for axis, size in static.items():  # dimensions the weights fix stay fixed in the ONNX model
        assert dims[axis] == size, dims

    fresh = torch.randn(*fresh_shape, generator=seeded(2))
    expected = compiled(fresh).numpy()
    (got,) = run_onnx(path, (fresh,)).values()
    assert got.shape == expected.shape
    # float32 on both sides; the only difference is the order of the sums inside GEMM, conv, softmax
    # and layer-norm kernels. Over reductions of at most 64 terms of O(1) values that is a few ulps
    # (~1e-6); measured at most 4e-7. 1e-5 leaves room without hiding a wrong op (those give >1e-2).
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


class BiasedAttention(nn.Module):
    """Attention written out with a learned bias on its scores, merged back by transpose and reshape
    (timm's Swin window attention when not fused)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.bias = nn.Parameter(torch.randn(2, 6, 6, generator=seeded(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        weights = (q * 8 ** -0.5 @ k.transpose(-2, -1) + self.bias.unsqueeze(0)).softmax(-1)
        return (weights @ v).transpose(1, 2).reshape(b, n, c)


def test_attention_fused_by_the_compiler_exports(tmp_path):
    # the fused op's output, transposed and reshaped, once made the exporter's decomposition view a
    # tensor it could not view (its fake strides differ between the exporter's steps)
    torch.manual_seed(0)
    model = BiasedAttention().eval()
    compiled = bevel.compile(model, "fuse_attention", example_inputs=(torch.randn(2, 6, 16, generator=seeded(1)),))
    assert compiled.report["fuse_attention"].stats["fused"] == 1
    path = compiled.export_onnx(str(tmp_path / "fused.onnx"))
    fresh = torch.randn(5, 6, 16, generator=seeded(2))
    (got,) = run_onnx(path, (fresh,)).values()
    np.testing.assert_allclose(got, compiled(fresh).detach().numpy(), rtol=1e-5, atol=1e-5)  # as above


def test_a_loaded_artifact_exports_too(tmp_path):
    torch.manual_seed(0)
    compiled = bevel.compile(MLP().eval(), "cleanup", example_inputs=(torch.randn(4, 16, generator=seeded(1)),))
    loaded = bevel.load(compiled.save(str(tmp_path / "artifact")))
    path = loaded.export_onnx(str(tmp_path / "loaded.onnx"))
    fresh = torch.randn(6, 16, generator=seeded(2))
    (got,) = run_onnx(path, (fresh,)).values()
    np.testing.assert_allclose(got, compiled(fresh).numpy(), rtol=1e-5, atol=1e-5)


# -- bad input ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_compiled():
    torch.manual_seed(0)
    return bevel.compile(MLP().eval(), "cleanup", example_inputs=(torch.randn(4, 16, generator=seeded(1)),))


@pytest.mark.parametrize("opset, message", [
    (DEFAULT_OPSET - 1, f"opset={DEFAULT_OPSET - 1} is too old.*{DEFAULT_OPSET}"),
    (9, f"opset=9 is too old.*{DEFAULT_OPSET}"),
    (str(DEFAULT_OPSET), "not an ONNX opset version"),
    (99, "opset=99 is newer than the installed onnx package knows"),
])
def test_a_bad_opset_is_refused(small_compiled, tmp_path, opset, message):
    with pytest.raises(ExportError, match=message):
        small_compiled.export_onnx(str(tmp_path / "model.onnx"), opset=opset)
    assert not os.listdir(tmp_path)


def test_a_newer_opset_is_written_or_refused_but_never_mislabelled(tmp_path):
    """The exporter writes opset 18 and converts; where an op has no converter it kept 18 under the
    requested label and onnx.checker then blamed the op. RMSNorm has none from opset 26 on (onnx 1.23,
    onnxscript 0.7): opset 20 is written, the newest refused. (The exporter's own GELU had none
    for 28; bevel's translation converts.)"""
    newest = onnx.defs.onnx_opset_version()
    model = nn.Sequential(nn.Linear(4, 8), nn.RMSNorm(8), nn.Linear(8, 2)).eval()
    compiled = bevel.compile(model, "cleanup", example_inputs=(torch.randn(2, 4, generator=seeded(1)),))
    for opset in (DEFAULT_OPSET + 2, newest):
        path = str(tmp_path / f"opset{opset}.onnx")
        try:
            compiled.export_onnx(path, opset=opset)
        except ExportError as error:
            assert f"could not write ONNX opset {opset}" in str(error) and f"opset {DEFAULT_OPSET} works" in str(error)
            continue
        written = {entry.domain: entry.version for entry in onnx.load(path, load_external_data=False).opset_import}
        assert written[""] == opset


def test_an_op_without_a_form_for_the_dtype_names_the_opset_that_has_one_and_float32(tmp_path):
    """A bfloat16 Conv is no ONNX op before opset 22; the checker's own words only said the type was
    unsupported. At opset 22 the checker accepts it (onnxruntime's CPU provider still has no kernel)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval().to(torch.bfloat16)
    compiled = bevel.compile(model, "cleanup", example_inputs=(torch.randn(2, 3, 8, 8, dtype=torch.bfloat16),))
    with pytest.raises(ExportError, match=r"has unsupported type: tensor\(bfloat16\)\. Conv has no bfloat16 form "
                                          r"in ONNX opset 18: opset=22 has one, though a runtime may lack its "
                                          r"kernel; compile the model in float32 to export it"):
        compiled.export_onnx(str(tmp_path / "bf16.onnx"))
    path = compiled.export_onnx(str(tmp_path / "bf16_22.onnx"), opset=22)  # passes the checker
    assert {e.domain: e.version for e in onnx.load(path, load_external_data=False).opset_import}[""] == 22


def test_the_default_opset_is_written(small_compiled, tmp_path):
    # DEFAULT_OPSET is the one place the opset is chosen: what CompiledModule.export_onnx and the CLI default to.
    from typer.testing import CliRunner

    from bevel.compiler.cli import app

    path = small_compiled.export_onnx(str(tmp_path / "model.onnx"))
    opsets = {entry.domain: entry.version for entry in onnx.load(path, load_external_data=False).opset_import}
    assert opsets[""] == DEFAULT_OPSET
    help_text = CliRunner().invoke(app, ["export", "--help"], terminal_width=200).output
    assert f"default: {DEFAULT_OPSET}" in help_text


def test_a_path_under_a_file_is_refused_naming_it(small_compiled, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    target = str(blocker / "model.onnx")
    with pytest.raises(ExportError, match="is a file, not a folder") as error:
        small_compiled.export_onnx(target)
    assert target in str(error.value)


@pytest.mark.parametrize("path", [None, 3])
def test_a_path_that_is_not_a_path_is_an_export_error(small_compiled, path):
    with pytest.raises(ExportError, match=f"takes the path of the file to write .*got {type(path).__name__}"):
        small_compiled.export_onnx(path)


def test_a_directory_path_is_refused(small_compiled, tmp_path):
    with pytest.raises(ExportError, match="is a directory") as error:
        small_compiled.export_onnx(str(tmp_path))
    assert str(tmp_path) in str(error.value)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc, a tree no one can create files in")
def test_an_unwritable_path_is_refused_naming_it(small_compiled):
    # tests run as root in CI, so permission bits stop nothing; /proc refuses new files even to root
    target = "/proc/bevel-test/model.onnx"
    with pytest.raises(ExportError, match="cannot write the ONNX model") as error:
        small_compiled.export_onnx(target)
    assert target in str(error.value)


def test_missing_folders_are_created(small_compiled, tmp_path):
    target = str(tmp_path / "a" / "b" / "model.onnx")
    assert small_compiled.export_onnx(target) == target
    assert os.path.isfile(target)


class NoneBetweenTensors(nn.Module):
    """Two tensor inputs with an optional one between them, given as None."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None, y: torch.Tensor | None = None):
        h = self.a(x)
        if extra is not None:
            h = h + extra
        return h + self.b(y)


def test_a_none_input_between_tensors_keeps_the_names_and_axes_of_the_others(tmp_path):
    """The ONNX inputs are the tensors, named as the model names them (y was exposed as 'extra', one
    name early) with their batch axis named 'batch'; fed by name, the file matches the compiled graph."""
    torch.manual_seed(0)
    compiled = bevel.compile(NoneBetweenTensors().eval(), "cleanup",
                             example_inputs=(torch.randn(2, 8), None, torch.randn(2, 8)))
    path = compiled.export_onnx(str(tmp_path / "model.onnx"))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("x", ["batch", 8]), ("y", ["batch", 8])]
    x, y = torch.randn(5, 8, generator=seeded(1)), 10 * torch.randn(5, 8, generator=seeded(2))
    (out,) = session.run(None, {"y": y.numpy(), "x": x.numpy()})
    np.testing.assert_allclose(out, compiled(x, None, y).detach().numpy(), atol=1e-5)


class DictInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.a(batch["x"]) + batch["y"]


def test_a_dict_input_is_refused_by_name(tmp_path):
    """It compiles and runs; the export, whose ONNX inputs are tensors, says so instead of the
    exporter's error about a missing argument."""
    batch = {"x": torch.randn(2, 8), "y": torch.randn(2, 8)}
    compiled = bevel.compile(DictInput().eval(), "cleanup", example_inputs=(batch,))
    with pytest.raises(ExportError, match="input 0 is a dict of tensors, and the ONNX export takes tensors"):
        compiled.export_onnx(str(tmp_path / "model.onnx"))
    assert not (tmp_path / "model.onnx").exists()


def test_onnxscript_loads_with_the_first_export_not_with_bevel(tmp_path):
    """The ONNX translations import onnxscript (a second or two): ``import bevel``, and so every CLI
    command, goes without it until something is exported."""
    code = ("import sys, torch, bevel\n"
            "loaded = 'onnxscript' in sys.modules\n"
            "cm = bevel.compile(torch.nn.Linear(4, 2), 'cleanup', example_inputs=(torch.randn(2, 4),))\n"
            "cm.export_onnx(sys.argv[1])\n"
            "print(loaded, 'onnxscript' in sys.modules)\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "linear.onnx")], capture_output=True,
                          text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "True"]
