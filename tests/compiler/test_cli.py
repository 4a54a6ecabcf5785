"""Tests for the ``bevel`` command line and the MODEL / --calibration resolution behind it.

Small models come from ``cli_models.py`` beside this file (found as ``cli_models:...`` from this
directory); the last two tests run the real MiniLM end to end (about a minute together).
"""

from __future__ import annotations

import fractions
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bevel.compiler.cli import app
from bevel.compiler.model_ref import resolve_calibration, resolve_model
from bevel.errors import BevelError, ModelLoadError

HERE = Path(__file__).resolve().parent
SMALL = "cli_models:small_mlp"


@pytest.fixture(autouse=True)
def in_test_directory(monkeypatch):
    """Run every command from this directory, where ``cli_models.py`` lies."""
    monkeypatch.chdir(HERE)


def bevel(*args: str):
    """Run the CLI in-process and return click's Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, list(args))


def error_line(result) -> str:
    """The single ``error:`` line a failed command printed on stderr."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def run_script(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


# --- the console script ----------------------------------------------------------------------------

def test_console_script_inspects_a_model_from_the_current_directory():
    script = Path(sys.executable).with_name("bevel")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "bevel.compiler.cli"]
    done = run_script(command + ["inspect", SMALL], cwd=HERE)
    assert done.returncode == 0, done.stderr
    assert "aten.linear" in done.stdout and "parameters:" in done.stdout


def test_module_entry_point_reports_a_user_error_in_one_line(tmp_path):
    done = run_script([sys.executable, "-m", "bevel.compiler.cli", "export", "no_such_module_xyz:build",
                       "--out", str(tmp_path)], cwd=HERE)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]  # one line, no traceback
    assert done.stderr.startswith("error: MODEL 'no_such_module_xyz:build'")
    assert "No module named 'no_such_module_xyz'" in done.stderr


def test_version():
    import bevel as package

    result = bevel("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"bevel {package.__version__}"


def test_every_command_has_help():
    for command in ([], ["passes"], ["inspect"], ["export"], ["demo"]):
        result = bevel(*command, "--help")
        assert result.exit_code == 0, result.output
        assert "Usage" in result.stdout
    export_help = bevel("export", "--help").stdout
    for flag in ("--passes", "--out", "--calibration", "--validation", "--max-fidelity-drop", "--opset", "--device",
                 "--static-shapes"):
        assert flag in export_help
    assert "--static-shapes" in bevel("inspect", "--help").stdout


# --- bevel passes ----------------------------------------------------------------------------------

def test_passes_lists_each_pass_with_its_params():
    result = bevel("passes")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "cleanup" in out and "prune.magnitude" in out
    assert "Zero the smallest-magnitude weights" in out  # the class docstring's summary
    for name in ("fold_constants", "max_folded_elements", "sparsity", "min_keep", "skip"):
        assert name in out
    assert "[0.0, 1.0)" in out  # sparsity's range
    assert "float" in out and "0.5" in out


def test_passes_say_needs_calibration_only_where_the_default_params_need_it():
    out = bevel("passes").stdout
    headers = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")}
    # importance="activation" or method="gptq" need calibration, but these passes' defaults do not
    for name in ("prune.magnitude", "prune.nm", "quantize.int4_weight", "lowrank", "cleanup"):
        assert "--calibration" not in headers[name], headers[name]
    passes = {entry["name"]: entry for entry in json.loads(bevel("passes", "--json").stdout)}
    assert passes["prune.nm"]["needs_calibration"] is False
    assert passes["quantize.int4_weight"]["needs_calibration"] is False


def test_passes_say_which_passes_each_cannot_share_a_pipeline_with_or_precede():
    out = bevel("passes").stdout
    headers = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")}
    assert headers["kv.quantize"] == ("kv.quantize  (not before layer_skip.static, layer_skip.early_exit; not with "
                                      "attention.block_sparse; once per pipeline)")
    assert headers["attention.heads"] == "attention.heads  (not with attention.window)"
    passes = {entry["name"]: entry for entry in json.loads(bevel("passes", "--json").stdout)}
    assert passes["kv.quantize"]["not_followed_by"] == ["layer_skip.static", "layer_skip.early_exit"]


def test_needs_calibration_of_a_pass_that_has_no_default_instance():
    from bevel.compiler.cli import _needs_calibration
    from bevel.errors import ParamError
    from bevel.passes.base import Pass

    class Needy(Pass):
        needs_calibration = True

        def __init__(self, **params):
            raise ParamError("a parameter without a default is missing")

    class Depends(Needy):
        @property
        def needs_calibration(self) -> bool:  # type: ignore[override]
            return True

    assert _needs_calibration(Needy) is True
    assert _needs_calibration(Depends) is None  # the property cannot be read without an instance


def test_passes_table_shows_every_param_name_type_and_default_whole():
    out = bevel("passes").stdout
    cells = {word for line in out.splitlines() for word in line.split()}
    for name in ("importance", "max_layer_error", "embedding_bits", "global_ranking", "max_folded_elements",
                 "param_ratio", '"magnitude"', "tuple[str,"):
        assert name in cells, name


def test_passes_give_each_param_a_line_and_its_help_in_whole_words_below_it():
    """As a table, the help column of a pass with a long type was squeezed to eight letters a line
    ("decrea", "sing"); each parameter now has a line of its own, its help wrapped below it."""
    out = bevel("passes").stdout
    lines = out.splitlines()
    start = lines.index("token_prune")
    at = lines.index("  r  int | tuple[int | str, ...] = 8", start)
    help_lines = []
    for line in lines[at + 1:]:
        if not line.startswith("      "):
            break
        help_lines.append(line.strip())
    assert " ".join(help_lines) == ('tokens removed per block: an int, a list of one per block, or [r, "decreasing"] '
                                    '(2r in the first block down to 0)')
    assert len(help_lines) > 1 and all(len(line) + 6 <= 80 for line in help_lines)  # at the terminal's width
    assert "  protect  int = 1  in [0, inf)" in lines


def test_passes_json():
    result = bevel("passes", "--json")
    assert result.exit_code == 0, result.output
    passes = {entry["name"]: entry for entry in json.loads(result.stdout)}
    assert {"cleanup", "prune.magnitude"} <= set(passes)
    params = {p["name"]: p for p in passes["prune.magnitude"]["params"]}
    assert params["sparsity"] == {"name": "sparsity", "type": "float", "default": 0.5, "range": "[0.0, 1.0)",
                                  "doc": "fraction of all Linear/Conv weights set to zero"}
    assert params["skip"]["default"] == []
    assert passes["cleanup"]["doc"].startswith("Remove dropout")


# --- bevel inspect ---------------------------------------------------------------------------------

def test_inspect_prints_histogram_size_and_flops():
    result = bevel("inspect", SMALL, "--graph")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "SmallMLP" in out and "x: f32[" in out
    assert "parameters:      808" in out  # 16*32+32 + 32*8+8
    assert "weight bytes:    3,232" in out
    assert "FLOPs:           6,144" in out  # 2*4*16*32 + 2*4*32*8 at batch 4
    histogram = {line.split()[1]: line.split()[3] for line in out.splitlines() if line.startswith("│ aten.")}
    assert histogram == {"aten.linear": "2", "aten.relu": "1", "aten.dropout": "1"}
    assert "top 2 nodes by FLOPs" in out and "66.7%" in out
    assert "aten.linear(%x, @fc1.weight, @fc1.bias)" in out  # the --graph listing
    assert "x: f32[4, 16]" not in out  # the batch dimension stays symbolic by default


def test_inspect_static_shapes_fixes_the_input_sizes():
    result = bevel("inspect", SMALL, "--static-shapes")
    assert result.exit_code == 0, result.output
    assert "inputs: x: f32[4, 16]" in result.stdout


def test_inspect_explain_says_which_nodes_a_rule_matches_and_why_not():
    result = bevel("inspect", SMALL, "--explain", "linear")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "rule linear: 2 of 2 nodes calling aten.linear matched" in out
    explained = out.split("rule linear:")[1]
    assert [line.split()[1:4:2] for line in explained.splitlines() if line.startswith("│ ")] == [
        ["linear", "matched"], ["linear_1", "matched"]]
    none = bevel("inspect", SMALL, "--explain", "linear.addmm")
    assert none.exit_code == 0 and "rule linear.addmm: no node calls aten.addmm, so nothing can match" in none.stdout
    wrong = bevel("inspect", SMALL, "--explain", "lineer")
    assert wrong.exit_code == 2
    assert ("unknown rule 'lineer' (did you mean 'linear'?); known rules: embedding, linear, linear.addmm"
            in wrong.stderr)


def test_inspect_a_causal_lm_shows_its_step_graph_and_the_tied_output_layer():
    result = bevel("inspect", "tinylm", "--top", "0", "--explain", "linear")
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())  # rich wraps long lines at the terminal width
    assert "a causal LM: its step graph" in out and "past_key_11: f32[" in out
    # 12 layers of q, k, v, o, gate, up and down; the output layer reads the embedding table
    assert "rule linear: 84 of 85 nodes calling aten.linear matched" in out
    assert "linear_84 │ check refused: its weight is read by more than one op" in out  # wrapped in its cell
    static = bevel("inspect", "tinylm", "--static-shapes")
    assert static.exit_code == 2 and "--static-shapes does not apply to a causal LM" in error_line(static)


# --- bevel export ----------------------------------------------------------------------------------

def test_export_small_model_writes_every_output(tmp_path):
    import onnxruntime

    import bevel as package

    out = tmp_path / "out"
    result = bevel("export", SMALL, "--passes", "cleanup | prune.magnitude(sparsity=0.5)", "--out", str(out))
    assert result.exit_code == 0, result.output
    for name in ("model.onnx", "model.onnx.data", "artifact/manifest.json", "report.md", "report.json"):
        assert (out / name).is_file(), name
        assert str(out / name.split("/")[0]) in result.stdout
    assert "bevel report: SmallMLP" in result.stdout
    assert "prune.magnitude: applied" in result.stderr  # the progress lines

    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["cleanup", "prune.magnitude"]
    assert report["passes"][1]["after"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert "| prune.magnitude | applied |" in (out / "report.md").read_text()

    # the artifact and the ONNX model compute the same function on fresh inputs
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(5))
    expected = package.load(str(out / "artifact"))(x)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(onnx_out), expected, rtol=1e-4, atol=1e-5)


def test_export_of_a_pass_without_onnx_form_fails_naming_it_and_keeps_the_artifact(tmp_path):
    """Into a directory an earlier export wrote: no model.onnx of that earlier model is left beside the
    new artifact."""
    out = tmp_path / "out"
    assert bevel("export", SMALL, "--out", str(out)).exit_code == 0
    assert (out / "model.onnx").is_file()
    result = bevel("export", "cli_models:padded_bert", "--passes", "unpad", "--out", str(out))
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert "bevel::pack_sequences, which has no ONNX form; `unpad` put it there" in line, line
    assert str(out / "artifact") in line, line
    assert (out / "artifact" / "manifest.json").is_file() and (out / "report.json").is_file()
    assert not (out / "model.onnx").exists() and not (out / "model.onnx.data").exists()


def test_export_static_shapes_writes_fixed_sizes(tmp_path):
    import onnx

    out = tmp_path / "out"
    result = bevel("export", SMALL, "--static-shapes", "--out", str(out))
    assert result.exit_code == 0, result.output
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    dims = [d.dim_value or d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [4, 16]
    manifest = json.loads((out / "artifact" / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] in ([4, 16], ["4", "16"])


# --- user errors: exit code 2, one clear message ---------------------------------------------------

@pytest.mark.parametrize("pipeline, expected", [
    ("cleanup | prune.magnitude(sparsity=)", "pipeline syntax error at line 1, column 36"),
    ("cleanup | prune.magnitud", "at line 1, column 11: unknown pass 'prune.magnitud'; did you mean "
                                 "'prune.magnitude'?"),
    ("prune.magnitude(sparsityy=0.3)", "at line 1, column 17: pass 'prune.magnitude' has no parameter "
                                       "'sparsityy'; did you mean 'sparsity'?"),
    ("prune.magnitude(sparsity=1.5)", "at line 1, column 26: prune.magnitude(sparsity=...): 1.5 is out of range; "
                                      "sparsity must be in [0.0, 1.0)"),
])
def test_pipeline_errors_show_the_caret(tmp_path, pipeline, expected):
    result = bevel("export", SMALL, "--passes", pipeline, "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    lines = result.stderr.rstrip("\n").splitlines()
    assert lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert lines[1] == pipeline and "^" in lines[2]  # the pipeline text, then the caret under the fault
    assert not (tmp_path / "out").exists()  # nothing ran


@pytest.mark.parametrize("args, expected", [
    (["inspect", "no_such_module_xyz:build"], "cannot import module 'no_such_module_xyz': No module named"),
    (["inspect", "cli_models"], "is not a valid reference: expected 'package.module:callable'"),
    (["inspect", "cli_models:"], "is not a valid reference"),
    (["inspect", "cli_models:small_mpl"], "has no attribute 'small_mpl'; did you mean 'small_mlp'?"),
    (["inspect", "cli_models:raises"], "raised RuntimeError: checkpoint weights.bin not found"),
    (["inspect", "cli_models:wrong_type"], "returned a str; the callable must return an nn.Module or "
                                           "(model, example_inputs)"),
    (["inspect", "cli_models:NOT_CALLABLE"], "is a int, not a callable"),
    (["inspect", "cli_models:module_only"], "the callable must return (model, example_inputs)"),
    (["export", SMALL, "--out", "unused", "--calibration", "nonsense"], "--calibration 'nonsense' is not understood"),
    (["export", SMALL, "--out", "unused", "--calibration", "builtin"], "--calibration builtin needs a built-in MODEL"),
    (["export", SMALL, "--out", "unused", "--calibration", "missing.pt"], "--calibration 'missing.pt': no such file"),
    (["export", SMALL, "--out", "unused", "--validation", "builtin"], "--validation builtin: a built-in model's own "
                                                                       "batches are its calibration batches"),
    (["export", SMALL, "--out", "unused", "--validation", "missing.pt"], "--validation 'missing.pt': no such file"),
    (["export", SMALL, "--out", "unused", "--validation", "nonsense"], "--validation 'nonsense' is not understood: "
                                                                       "give package.module:callable, a .pt file "
                                                                       "holding a list of input tuples"),
    (["export", SMALL, "--out", "unused", "--device", "tpu9"], "device='tpu9' is not a device torch knows"),
    (["export", SMALL, "--out", "unused", "--device", "meta"], "bevel compiles for 'cpu' or 'cuda', not 'meta'"),
    (["export", SMALL], "Missing option '--out'"),
    (["export", SMALL, "--out", "unused", "--opset", "11"], "Invalid value for '--opset'"),
    (["export", SMALL, "--out", "unused", "--opset", "99"], "opset=99 is newer than the installed onnx package knows"),
    (["export", SMALL, "--out", "cli_models.py"], "dir 'cli_models.py' is a file"),
    (["export", SMALL, "--out", "cli_models.py/sub"], "cli_models.py' is a file, not a directory"),
    (["export", SMALL, "--out", "unused", "--passes", 'prune.magnitude(importance="activation")'],
     "pass 'prune.magnitude' needs calibration data"),
    (["export", "cli_models:exits", "--out", "unused"], "calling cli_models:exits() raised SystemExit: 3"),
    (["frobnicate"], "No such command 'frobnicate'"),
])
def test_user_errors_exit_2_with_one_line(args, expected):
    result = bevel(*args)
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert expected in line, line
    assert result.stderr.rstrip("\n").splitlines()[-1] == line  # the error is the last word
    assert not Path("unused").exists()


def test_export_of_a_causal_lm_writes_a_generating_artifact_and_the_step_graph_with_its_cache(tmp_path):
    result = bevel("export", "cli_models:decoder_lm", "--passes", "cleanup", "--out", str(tmp_path))
    import onnx

    import bevel as package

    assert result.exit_code == 0, result.output
    loaded = package.load(str(tmp_path / "artifact"))
    ids = torch.tensor([[5, 7, 9]])
    assert loaded.generate(ids, max_new_tokens=4).shape == (1, 3 + 4)
    names = [i.name for i in onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph.input]
    assert names[:4] == ["input_ids", "position_ids", "cache_position", "kv_positions"]
    assert names[4:] == ["past_key_0", "past_value_0", "past_key_1", "past_value_1"]
    # the flag is named (the error named bevel.compile's dynamic_shapes argument); nothing is written
    static = bevel("export", "cli_models:decoder_lm", "--static-shapes", "--out", str(tmp_path / "static"))
    assert static.exit_code == 2 and "--static-shapes does not apply to a causal LM" in error_line(static)
    assert not (tmp_path / "static").exists()


def test_a_module_that_exits_while_imported_is_named(tmp_path, monkeypatch):
    (tmp_path / "exits_on_import.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.chdir(tmp_path)
    result = bevel("export", "exits_on_import:build", "--out", "out")
    assert result.exit_code == 2, result.output
    assert "importing module 'exits_on_import' raised SystemExit: 3" in error_line(result)


def test_an_out_directory_holding_a_file_named_artifact_is_refused_before_work(tmp_path):
    (tmp_path / "artifact").write_text("not a directory")
    result = bevel("export", SMALL, "--out", str(tmp_path))
    assert result.exit_code == 2, result.output
    assert f"'{tmp_path / 'artifact'}' exists and is not a directory" in error_line(result)
    assert "captur" not in result.stderr.lower()  # refused before the model was captured


def test_capture_errors_exit_2_and_quote_the_failing_line():
    result = bevel("inspect", "cli_models:branch_on_values")
    assert result.exit_code == 2, result.output
    lines = result.stderr.rstrip("\n").splitlines()
    assert lines[0].startswith("error: could not capture DataDependent with torch.export"), lines
    assert any("models_zoo.py" in line and "if x.sum() > 0:" in line for line in lines[1:]), lines  # its own line
    assert lines[-1].lstrip().startswith("try:")
    assert "def forward" not in result.stderr  # torch's partial graph listing is not dumped


@pytest.mark.parametrize("out", ["made/out", "made/../other/out"])
def test_an_export_that_fails_leaves_no_directory_behind(tmp_path, out):
    result = bevel("export", "cli_models:branch_on_values", "--out", str(tmp_path / out))
    assert result.exit_code == 2 and "could not capture DataDependent" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_unexpected_exceptions_are_not_hidden(monkeypatch):
    import bevel.compiler.model_ref as model_ref

    def broken(ref, example_inputs=None):
        raise RuntimeError("a bug in bevel")

    monkeypatch.setattr(model_ref, "resolve_model", broken)
    result = bevel("inspect", SMALL)
    assert result.exit_code == 1
    assert isinstance(result.exception, RuntimeError)


# --- MODEL and --calibration resolution ------------------------------------------------------------

def test_resolve_model_uses_given_example_inputs_for_a_bare_module():
    inputs = (torch.zeros(2, 16),)
    model, example_inputs = resolve_model("cli_models:module_only", example_inputs=inputs)
    assert isinstance(model, torch.nn.Module) and example_inputs == inputs
    model, example_inputs = resolve_model(SMALL)
    assert example_inputs[0].shape == (4, 16)
    with pytest.raises(ModelLoadError, match="must return \\(model, example_inputs\\)"):
        resolve_model("cli_models:module_only")


def test_calibration_from_callable_file_and_builtin(tmp_path):
    batches = resolve_calibration("cli_models:calibration", SMALL)
    assert len(batches) == 3 and all(isinstance(b, tuple) and b[0].shape == (4, 16) for b in batches)
    assert resolve_calibration(None, SMALL) is None

    path = tmp_path / "calib.pt"
    torch.save([(torch.ones(2, 16),), torch.zeros(3, 16)], path)  # a lone tensor counts as a 1-tuple
    loaded = resolve_calibration(str(path), SMALL)
    assert [b[0].shape for b in loaded] == [(2, 16), (3, 16)]

    torch.save({"not": "a list"}, tmp_path / "dict.pt")
    with pytest.raises(BevelError, match="holds a dict; it must hold a list of input tuples"):
        resolve_calibration(str(tmp_path / "dict.pt"), SMALL)
    torch.save([], tmp_path / "empty.pt")
    with pytest.raises(BevelError, match="gave no batches"):
        resolve_calibration(str(tmp_path / "empty.pt"), SMALL)
    with pytest.raises(BevelError, match="has no attribute 'calibraton'; did you mean 'calibration'"):
        resolve_calibration("cli_models:calibraton", SMALL)


def test_a_calibration_file_torch_cannot_load_is_explained(tmp_path):
    """torch.load's own words were a bare "101" for a text file, and terminal colour codes for objects
    weights_only refuses."""
    (tmp_path / "text.pt").write_text("hello, not a tensor file")
    with pytest.raises(BevelError) as caught:
        resolve_calibration(str(tmp_path / "text.pt"), SMALL)
    # torch reads a text file as an old-format pickle and fails on a byte it takes for a key
    assert re.fullmatch(
        r"--calibration '.*text\.pt' could not be loaded with torch\.load\(weights_only=True\) \(KeyError: \d+; "
        r"the file is not the zip archive torch\.save writes\); save a list of tuples of tensors with torch\.save",
        str(caught.value))
    torch.save([(fractions.Fraction(1, 2),)], tmp_path / "object.pt")
    with pytest.raises(BevelError, match=r"\(UnpicklingError: Weights only load failed\.") as caught:
        resolve_calibration(str(tmp_path / "object.pt"), SMALL)
    assert "\x1b" not in str(caught.value)


def test_export_with_calibration_gives_a_bare_module_its_inputs(tmp_path):
    result = bevel("export", "cli_models:module_only", "--calibration", "cli_models:calibration",
                   "--max-fidelity-drop", "0.5", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["calibration_batches"] == 3 and report["max_fidelity_drop"] == 0.5


def test_export_with_validation_batches_reports_their_fidelity(tmp_path):
    path = tmp_path / "held_out.pt"
    torch.save([(torch.randn(5, 16),), (torch.randn(7, 16),)], path)
    result = bevel("export", SMALL, "--passes", "prune.magnitude(sparsity=0.5)", "--calibration",
                   "cli_models:calibration", "--validation", str(path), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["quality"]["held-out cosine"] == pytest.approx(1.0, abs=1e-6)  # the captured graph
    held_out = report["passes"][0]["quality"]["held-out cosine"]
    assert 0 < held_out < 1
    assert f"held-out cosine {held_out:.4g}" in result.stdout


# --- the real model, end to end (slow: about a minute together) ------------------------------------

def test_export_minilm_end_to_end(tmp_path):
    result = bevel("export", "minilm", "--passes", "cleanup | prune.magnitude(sparsity=0.3)", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    for name in ("model.onnx", "artifact/manifest.json", "artifact/weights.safetensors", "report.md", "report.json"):
        assert (tmp_path / name).is_file(), name
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["model"] == "BertModel"
    assert report["calibration_batches"] == 4  # minilm's own batches, used by default
    prune = report["passes"][-1]
    assert prune["name"] == "prune.magnitude(sparsity=0.3)" and prune["status"] == "applied"
    assert prune["after"]["sparsity"] == pytest.approx(0.30, abs=0.01)
    assert prune["stats"]["sparsity"] == pytest.approx(0.30, abs=0.01)
    assert "bevel report: BertModel" in result.stdout


def test_demo_prints_the_report_and_the_latency_ratio():
    result = bevel("demo", "--runs", "2", "--warmup", "1", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "bevel report: BertModel" in out
    assert "quantize.int8_dynamic" in out and "applied" in out
    assert "median of 2 runs after 1 warm-up" in out
    assert "speedup" in out and "fidelity (cosine vs original" in out
