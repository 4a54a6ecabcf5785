"""Tests for artifacts: save, ``bevel.load`` in a fresh process (bit-exact), tamper detection, ties, sizes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from torch import nn
from torch.utils._pytree import keystr, tree_flatten_with_path

import bevel
from bevel.errors import ArtifactError
from bevel.runtime.artifact import FORMAT_VERSION, INPUTS, MANIFEST, PROGRAM, REPORT, WEIGHTS, verify_artifact
from tests.models_zoo import seeded

# Run by a fresh interpreter: load the artifact, run it on inputs from a file, save the outputs by
# pytree path, and list which transformers modules the load imported. It never imports BertModel.
FRESH_PROCESS_SCRIPT = textwrap.dedent(r"""
    import json, re, sys
    import torch
    from torch.utils._pytree import keystr, tree_flatten_with_path
    import bevel

    artifact, inputs_file, outputs_file, modules_file = sys.argv[1:]
    inputs = torch.load(inputs_file)
    compiled = bevel.load(artifact)
    outputs = compiled(*inputs)
    leaves = {re.sub(r"\W", "", keystr(path)): value for path, value in tree_flatten_with_path(outputs)[0]}
    torch.save({"type": f"{type(outputs).__module__}.{type(outputs).__qualname__}", "leaves": leaves}, outputs_file)
    with open(modules_file, "w") as f:
        json.dump(sorted(name for name in sys.modules if name.startswith("transformers")), f)
""")


def by_path(outputs) -> dict[str, torch.Tensor]:
    """Output leaves by path, the path without punctuation (``.x`` and ``['x']`` both give ``x``)."""
    return {re.sub(r"\W", "", keystr(path)): value for path, value in tree_flatten_with_path(outputs)[0]}


@pytest.fixture(scope="module")
def minilm_artifact(minilm_pruned, tmp_path_factory) -> str:
    """The shared pruned MiniLM saved once; tests that modify it work on a copy."""
    return minilm_pruned.save(str(tmp_path_factory.mktemp("artifact") / "minilm"))


@pytest.fixture
def artifact_copy(minilm_artifact, tmp_path):
    """A private copy of the MiniLM artifact, removed after the test (it is 90 MB)."""
    target = str(tmp_path / "copy")
    shutil.copytree(minilm_artifact, target)
    yield target
    shutil.rmtree(target, ignore_errors=True)


def flip_middle_byte(file: str) -> None:
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))


def rewrite_manifest(artifact: str, change) -> None:
    file = os.path.join(artifact, MANIFEST)
    with open(file) as f:
        manifest = json.load(f)
    change(manifest)
    with open(file, "w") as f:
        json.dump(manifest, f)


# -- the real model: a fresh process reproduces the outputs exactly ----------------------------------


def test_fresh_process_load_reproduces_outputs_exactly(minilm_pruned, minilm_artifact, fresh_sentences, tmp_path):
    expected = minilm_pruned(*fresh_sentences)
    script, inputs_file = tmp_path / "run_artifact.py", tmp_path / "inputs.pt"
    outputs_file, modules_file = tmp_path / "outputs.pt", tmp_path / "modules.json"
    script.write_text(FRESH_PROCESS_SCRIPT)
    torch.save(tuple(fresh_sentences), inputs_file)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(script), minilm_artifact, str(inputs_file), str(outputs_file),
                          str(modules_file)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    got = torch.load(outputs_file)
    assert got["type"] == f"{type(expected).__module__}.{type(expected).__qualname__}"
    want = by_path(expected)
    assert set(got["leaves"]) == set(want) == {"last_hidden_state", "pooler_output"}
    for name, value in want.items():
        assert torch.equal(got["leaves"][name], value), f"{name} differs after loading in a fresh process"
    # the output container's module (transformers.modeling_outputs) is imported to rebuild the output
    # structure, but the model's class (BertModel in transformers.models.bert) never is
    imported = json.loads(modules_file.read_text())
    assert "transformers.modeling_outputs" in imported
    assert not [name for name in imported if name.startswith("transformers.models")], imported


def test_load_keeps_report_pipeline_and_inputs(minilm_pruned, minilm_artifact, fresh_sentences):
    loaded = bevel.load(minilm_artifact)
    assert loaded.report.to_json() == minilm_pruned.report.to_json()
    assert loaded.pipeline == minilm_pruned.pipeline == "cleanup | prune.magnitude(sparsity=0.3)"
    assert loaded.input_specs == minilm_pruned.input_specs
    for got, want in zip(loaded.example_inputs, minilm_pruned.example_inputs):
        assert torch.equal(got, want)
    assert type(loaded(*fresh_sentences)) is type(minilm_pruned(*fresh_sentences))


def test_saving_a_loaded_artifact_round_trips(minilm_pruned, minilm_artifact, fresh_sentences, tmp_path):
    loaded = bevel.load(minilm_artifact)
    again = bevel.load(loaded.save(str(tmp_path / "again")))
    expected = by_path(minilm_pruned(*fresh_sentences))
    for name, value in by_path(again(*fresh_sentences)).items():
        assert torch.equal(value, expected[name]), name
    assert again.report.to_json() == minilm_pruned.report.to_json()
    assert again.pipeline == minilm_pruned.pipeline
    # the weights are written byte for byte the same
    assert (verify_artifact(str(tmp_path / "again"))["files"][WEIGHTS]
            == verify_artifact(minilm_artifact)["files"][WEIGHTS])


def test_program_holds_no_copy_of_the_weights(minilm_pruned, minilm_artifact):
    sizes = {name: os.path.getsize(os.path.join(minilm_artifact, name)) for name in os.listdir(minilm_artifact)}
    weight_bytes = sum(t.numel() * t.element_size() for t in
                       list(minilm_pruned.graph_module.parameters()) + list(minilm_pruned.graph_module.buffers()))
    assert sizes[PROGRAM] < 0.05 * sizes[WEIGHTS], sizes
    # weights.safetensors is the weights plus a small header, stored once
    assert weight_bytes <= sizes[WEIGHTS] < weight_bytes * 1.01 + 65536, (sizes, weight_bytes)
    assert sum(sizes.values()) < weight_bytes * 1.05, (sizes, weight_bytes)
    assert not [name for name in sizes if name.endswith(".tmp")]


# -- tampered, incomplete and foreign artifacts -----------------------------------------------------


@pytest.mark.parametrize("name", [WEIGHTS, PROGRAM])
def test_a_flipped_byte_is_refused_naming_the_file(artifact_copy, name):
    flip_middle_byte(os.path.join(artifact_copy, name))
    with pytest.raises(ArtifactError, match=name.replace(".", r"\.")) as error:
        bevel.load(artifact_copy)
    assert "sha256" in str(error.value) and artifact_copy in str(error.value)


@pytest.mark.parametrize("name", [WEIGHTS, PROGRAM, INPUTS, REPORT, MANIFEST])
def test_a_missing_file_is_named(small_artifact, name):
    os.remove(os.path.join(small_artifact, name))
    with pytest.raises(ArtifactError, match=f"{name.replace('.', '[.]')} is missing"):
        bevel.load(small_artifact)


@pytest.mark.parametrize("content, message", [
    ('{"format": "bevel-artifact", "format_', "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
    ("[1, 2, 3]", "not a bevel artifact manifest"),
    ('{"format": "something-else", "format_version": 1}', "not a bevel artifact manifest"),
    ('{"format": "bevel-artifact"}', "no valid format_version"),
    ('{"format": "bevel-artifact", "format_version": "1"}', "no valid format_version"),
])
def test_a_corrupt_manifest_is_refused_clearly(small_artifact, content, message):
    with open(os.path.join(small_artifact, MANIFEST), "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ArtifactError, match=message) as error:
        bevel.load(small_artifact)
    assert MANIFEST in str(error.value)


@pytest.mark.parametrize("field, value, message", [
    ("files", ["weights.safetensors"], '"files" must be'),
    ("files", {"../../etc/passwd": "0" * 64}, "not a plain file name"),
    ("aliases", "x", '"aliases" must be'),
    ("container_types", [{"type": "x"}], '"container_types" must be'),
])
def test_a_manifest_with_wrong_fields_is_refused(small_artifact, field, value, message):
    rewrite_manifest(small_artifact, lambda manifest: manifest.update({field: value}))
    with pytest.raises(ArtifactError, match=message):
        bevel.load(small_artifact)


DECODER = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "vocab_size": 50, "max_cache_len": 64}


@pytest.mark.parametrize("field, value, named", [
    ("aliases", {"a": ["x"]}, "aliases"),
    ("aliases", {"a": 1}, "aliases"),
    ("frozen", [[1]], "frozen"),
    ("frozen", [1], "frozen"),
    ("inputs", ["x"], "inputs"),
    ("non_tensor_inputs", {"1": [1, 2]}, "non_tensor_inputs"),
    ("cpu_linears", "onednn", "cpu_linears"),
    ("cpu_linears", [[32, 8, 8]], "cpu_linears"),
    ("cpu_linears", [[32, 8, "8", "onednn"]], "cpu_linears"),
    ("cpu_linears", [[32, 8, 8, "fast"]], "cpu_linears"),
    ("decoder", "x", "decoder"),
    ("decoder", [], "decoder"),
    ("decoder", None, "decoder"),
    ("decoder", {**DECODER, "num_layers": "2"}, "decoder.num_layers"),
    ("decoder", {**DECODER, "max_cache_len": True}, "decoder.max_cache_len"),
    ("decoder", {**DECODER, "eos_token_id": [1, "2"]}, "decoder.eos_token_id"),
    ("decoder", {**DECODER, "eos_token_id": []}, "decoder.eos_token_id"),
    ("decoder", {**DECODER, "max_positions": "32"}, "decoder.max_positions"),
    ("decoder", {**DECODER, "cache_dtype": "nonsense"}, "decoder.cache_dtype"),
    ("decoder", {**DECODER, "kv_heads": [2]}, "decoder.kv_heads"),  # one per layer
    ("decoder", {**DECODER, "kv_heads": [2, 0]}, "decoder.kv_heads"),
    ("decoder", {**DECODER, "native_windows": [4]}, "decoder.native_windows"),  # one per layer
    ("decoder", {**DECODER, "native_windows": [4, -1]}, "decoder.native_windows"),
    ("decoder", {**DECODER, "cache_policy": "x"}, "decoder.cache_policy"),
    ("decoder", {**DECODER, "cache_policy": {"window": "8"}}, "decoder.cache_policy"),
])
def test_a_manifest_with_malformed_field_contents_is_refused(small_artifact, field, value, named):
    rewrite_manifest(small_artifact, lambda manifest: manifest.update({field: value}))
    with pytest.raises(ArtifactError) as error:
        bevel.load(small_artifact)
    message = str(error.value)
    assert f'"{named}" must be' in message and MANIFEST in message and small_artifact in message, message


def test_a_manifest_that_drops_a_file_is_refused(small_artifact):
    rewrite_manifest(small_artifact, lambda manifest: manifest["files"].pop(WEIGHTS))
    with pytest.raises(ArtifactError, match=f"does not list {WEIGHTS}"):
        bevel.load(small_artifact)


def test_a_future_format_version_asks_for_a_newer_bevel(small_artifact):
    rewrite_manifest(small_artifact, lambda manifest: manifest.update(format_version=FORMAT_VERSION + 1,
                                                                      bevel_version="9.0.0"))
    with pytest.raises(ArtifactError, match=f"format version {FORMAT_VERSION + 1}.*newer bevel.*upgrade"):
        bevel.load(small_artifact)


def test_a_path_that_does_not_exist(tmp_path):
    missing = str(tmp_path / "no" / "such" / "artifact")
    with pytest.raises(ArtifactError, match="does not exist") as error:
        bevel.load(missing)
    assert missing in str(error.value)


def test_a_file_is_not_an_artifact(tmp_path):
    file = tmp_path / "model.bin"
    file.write_bytes(b"\0" * 16)
    with pytest.raises(ArtifactError, match="not an artifact"):
        bevel.load(str(file))


@pytest.mark.parametrize("path", [123, None, ["out"]])
def test_a_path_that_is_not_a_path_is_an_artifact_error(small_compiled, path):
    kind = type(path).__name__
    with pytest.raises(ArtifactError, match=f"bevel.load takes the path of an artifact directory.*got {kind}"):
        bevel.load(path)
    with pytest.raises(ArtifactError, match=f"CompiledModule.save takes the path.*got {kind}"):
        small_compiled.save(path)


def test_a_path_object_or_bytes_loads(small_compiled, small_artifact):
    import pathlib

    x = torch.randn(2, 12, generator=seeded(10))
    for path in (pathlib.Path(small_artifact), os.fsencode(small_artifact)):
        torch.testing.assert_close(bevel.load(path)(x), small_compiled(x), rtol=0, atol=0)


def test_a_failed_re_export_is_an_artifact_error(small_compiled, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise torch._dynamo.exc.UserError(torch._dynamo.exc.UserErrorType.INVALID_INPUT,
                                          "cannot trace this graph\n(long torch details)")

    monkeypatch.setattr(torch.export, "export", refuse)
    with pytest.raises(ArtifactError) as error:
        small_compiled.save(str(tmp_path / "art"))
    message = str(error.value)
    assert "re-exporting the compiled graph with torch.export failed" in message
    assert "UserError: cannot trace this graph" in message and "long torch details" not in message
    assert str(tmp_path / "art") in message
    assert isinstance(error.value.__cause__, torch._dynamo.exc.UserError)
    assert not (tmp_path / "art" / MANIFEST).exists()


def test_a_full_disk_is_an_artifact_error_naming_the_file(tmp_path):
    """The program written onto a full device (its path a link to /dev/full, whose writes fail with
    ENOSPC): an ArtifactError naming the file, no half-written manifest, and the process alive (torch's
    zip writer, writing there itself, aborted the process). Run in a child process for that reason."""
    script = textwrap.dedent(f"""
        import os, torch, bevel
        model = torch.nn.Sequential(torch.nn.Linear(64, 64)).eval()
        compiled = bevel.compile(model, "cleanup", example_inputs=(torch.randn(2, 64),))
        os.symlink("/dev/full", os.path.join({str(tmp_path)!r}, "program.pt2"))
        try:
            compiled.save({str(tmp_path)!r})
        except bevel.ArtifactError as error:
            print("ArtifactError:", error)
        print("files:", sorted(os.listdir({str(tmp_path)!r})))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"No space left on device ({tmp_path / PROGRAM})" in done.stdout
    assert "manifest.json" not in done.stdout


def test_every_file_of_an_artifact_gets_the_same_permissions(small_compiled, tmp_path):
    """safetensors writes its files readable by their owner only; under a umask of 022 every file of
    the artifact is 0644, so another user may load it."""
    previous = os.umask(0o022)
    try:
        path = small_compiled.save(str(tmp_path / "art"))
    finally:
        os.umask(previous)
    modes = {name: oct(os.stat(os.path.join(path, name)).st_mode & 0o777) for name in os.listdir(path)}
    assert modes == {name: "0o644" for name in (MANIFEST, WEIGHTS, PROGRAM, INPUTS, REPORT)}


def test_saving_onto_a_file_is_refused(small_compiled, tmp_path):
    file = tmp_path / "taken"
    file.write_text("x")
    with pytest.raises(ArtifactError, match="taken"):
        small_compiled.save(str(file))


def test_an_unimportable_output_type_is_named(small_artifact):
    rewrite_manifest(small_artifact, lambda manifest: manifest.update(
        container_types=[{"type": "no_such_package.outputs.Out", "module": "no_such_package.outputs"}]))
    with pytest.raises(ArtifactError, match="no_such_package.outputs.*cannot be imported"):
        bevel.load(small_artifact)


# -- small models -----------------------------------------------------------------------------------


class TiedLM(nn.Module):
    """A tiny language model whose output projection is its embedding (one Parameter used twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(ids))))


class TwoHeads(nn.Module):
    """An MLP returning a dict, so the output structure is not a bare tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 32), nn.GELU())
        self.a, self.b = nn.Linear(32, 3), nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {"logits": self.a(h), "score": self.b(h).squeeze(-1)}


@pytest.fixture(scope="module")
def small_compiled():
    torch.manual_seed(0)
    return bevel.compile(TwoHeads().eval(), "cleanup", example_inputs=(torch.randn(4, 12, generator=seeded(1)),))


@pytest.fixture
def small_artifact(small_compiled, tmp_path) -> str:
    return small_compiled.save(str(tmp_path / "small"))


def test_small_model_round_trip_keeps_output_structure(small_compiled, small_artifact):
    x = torch.randn(7, 12, generator=seeded(2))
    loaded = bevel.load(small_artifact)
    got, want = loaded(x), small_compiled(x)
    assert isinstance(got, dict) and list(got) == ["logits", "score"]
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert loaded.report.to_json() == small_compiled.report.to_json()


def test_tied_weights_stay_tied(tmp_path):
    torch.manual_seed(0)
    model = TiedLM().eval()
    compiled = bevel.compile(model, "cleanup", example_inputs=(torch.randint(0, 50, (2, 7), generator=seeded(3)),))
    loaded = bevel.load(compiled.save(str(tmp_path / "tied")))
    ids = torch.randint(0, 50, (3, 11), generator=seeded(4))
    assert torch.equal(loaded(ids), compiled(ids))
    assert torch.allclose(loaded(ids), model(ids), rtol=0, atol=1e-6)

    # the embedding lookup and the output projection read one and the same Parameter
    graph = loaded.graph_module.graph
    embedding = next(n for n in graph.nodes if n.target == torch.ops.aten.embedding.default)
    linear = next(n for n in graph.nodes if n.target == torch.ops.aten.linear.default
                  and n.args[1].op == "get_attr" and loaded.graph_module.get_parameter(n.args[1].target).shape[0] == 50)
    tied = [loaded.graph_module.get_parameter(node.args[i].target) for node, i in ((embedding, 0), (linear, 1))]
    assert tied[0] is tied[1]
    # and the file stores it once
    with safe_open(os.path.join(str(tmp_path / "tied"), WEIGHTS), "pt") as f:
        shapes = [tuple(f.get_slice(k).get_shape()) for k in f.keys()]
    assert shapes.count((50, 16)) == 1, shapes


def test_requires_grad_is_restored_so_kernels_match(tmp_path):
    """A Linear on a transposed input folds differently when its weight requires grad; the loaded
    module must take the same kernels as the in-process one to reproduce it bit for bit."""

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 32)
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.proj(x)
            return self.attn(h, h, h, need_weights=False)[0]

    torch.manual_seed(0)
    compiled = bevel.compile(Attention().eval(), "cleanup", example_inputs=(torch.randn(2, 6, 8, generator=seeded(5)),))
    loaded = bevel.load(compiled.save(str(tmp_path / "attention")))
    x = torch.randn(3, 6, 8, generator=seeded(6))
    assert torch.equal(loaded(x), compiled(x))
    assert ({n: p.requires_grad for n, p in loaded.graph_module.named_parameters()}
            == {n: p.requires_grad for n, p in compiled.graph_module.named_parameters()})


def test_a_loaded_artifact_saves_over_itself(small_compiled, small_artifact):
    """The loaded weights own their memory: rewriting the files they came from changes nothing."""
    x = torch.randn(5, 12, generator=seeded(9))
    loaded = bevel.load(small_artifact)
    loaded.save(small_artifact)
    again = bevel.load(small_artifact)
    for got in (loaded(x), again(x)):
        assert all(torch.equal(got[k], v) for k, v in small_compiled(x).items())
