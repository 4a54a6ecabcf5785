"""The ``bevel`` command line: list passes, inspect a model's graph, export a compiled model, run the demo.

User errors (a bevel.BevelError or a usage error) exit with code 2 and one ``error:`` line on stderr;
pipeline errors keep their caret lines and capture errors the model's failing line. Anything else
is a bug and shows its traceback.
"""

from __future__ import annotations

import contextlib
import inspect as pyinspect
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperGroup

import bevel
from bevel.errors import BevelError, CaptureError, ExportError, PipelineError, first_line
from bevel.passes.base import format_value
from bevel.ir.onnx_export import DEFAULT_OPSET, check_opset

DEMO_PIPELINE = "cleanup | quantize.int8_dynamic"

STATIC_SHAPES_HELP = ("Fix every input dimension to the example inputs' sizes when capturing (dynamic_shapes="
                      "\"static\"), for a model whose capture fails with dynamic sizes.")


def _click_exception_class(name: str) -> type[Exception]:
    """Click's ``UsageError``/``ClickException`` as typer uses them (newer typers vendor their own click)."""
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)


_UsageError = _click_exception_class("UsageError")
_ClickException = _click_exception_class("ClickException")


class BevelGroup(TyperGroup):
    """Turns user errors into exit code 2 and one ``error:`` line instead of a traceback or a usage box."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name or "bevel", complete_var, standalone_mode=False, **extra)
        except (PipelineError, CaptureError) as error:  # carets / the failing model line are worth the lines
            _fail(str(error))
        except BevelError as error:
            _fail(first_line(error))
        except _ClickException as error:
            if type(error).__name__ == "NoArgsIsHelpError":  # plain `bevel`: the help is already printed
                sys.exit(error.exit_code)
            _fail(first_line(error.format_message()), 2 if isinstance(error, _UsageError) else error.exit_code)
        except typer.Abort:
            print("Aborted.", file=sys.stderr)
            sys.exit(1)
        # in non-standalone mode click returns the code of an explicit exit (--help, --version)
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(cls=BevelGroup, name="bevel", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bevel {bevel.__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print bevel's version and exit.")) -> None:
    """bevel: capture a PyTorch model with torch.export, rewrite its graph with passes, and export the result.

    MODEL is a built-in name (minilm, tinylm) or package.module:callable.

    The callable returns (model, example_inputs); modules in the current directory are found.
    """


# --- bevel passes ----------------------------------------------------------------------------------

@app.command("passes")
def passes_command(as_json: bool = typer.Option(False, "--json", help="Print the passes as JSON.")) -> None:
    """List every registered pass with its parameters: type, default, accepted range and help."""
    from bevel.passes.registry import available_passes

    described = [_describe_pass(name, cls) for name, cls in available_passes().items()]
    if as_json:
        typer.echo(json.dumps(described, indent=2, default=repr))
        return
    console = Console(highlight=False)
    for entry in described:
        needs = []
        if entry["needs_calibration"]:
            needs.append("needs --calibration")
        elif entry["needs_calibration"] is None:
            needs.append("may need --calibration, depending on its parameters")
        if entry["requires"]:
            needs.append("after " + ", ".join(entry["requires"]))
        if entry["not_followed_by"]:
            needs.append("not before " + ", ".join(entry["not_followed_by"]))
        others = [name for name in entry["conflicts"] if name != entry["name"]]
        if others:
            needs.append("not with " + ", ".join(others))
        if entry["name"] in entry["conflicts"]:
            needs.append("once per pipeline")
        console.print(f"[bold]{escape(entry['name'])}[/bold]" + escape(f"  ({'; '.join(needs)})" if needs else ""),
                      soft_wrap=True)
        console.print(f"  {escape(entry['doc'])}", soft_wrap=True)
        # one line per parameter (name, type, default, range) and its help below it, wrapped at the
        # terminal's width: as table columns, the help was squeezed to a few letters a line
        for p in entry["params"]:
            head = f"  {p['name']}  {p['type']} = {format_value(p['default'])}" + (f"  in {p['range']}" if p["range"]
                                                                                   else "")
            console.print(escape(head), soft_wrap=True)
            for line in textwrap.wrap(p["doc"], width=max(40, console.width - 6), break_long_words=False):
                console.print(escape("      " + line), soft_wrap=True)
        console.print()


def _describe_pass(name: str, cls: Any) -> dict[str, Any]:
    doc = pyinspect.getdoc(cls) or ""
    summary = " ".join(doc.split("\n\n")[0].split())  # the first paragraph, on one line
    return {"name": name, "doc": summary, "needs_calibration": _needs_calibration(cls),
            "requires": list(cls.requires), "conflicts": list(cls.conflicts),
            "not_followed_by": [name for name, _ in cls.not_followed_by], "params": cls.Params.describe()}


def _needs_calibration(cls: Any) -> bool | None:
    """Whether the pass at its default parameters needs calibration batches; None when that depends on
    parameters without defaults. A pass may declare the need as a property of its parameters, which
    only an instance can answer (on the class it is a property object, always truthy)."""
    try:
        return bool(cls().needs_calibration)
    except BevelError:  # a parameter has no default (lowrank: energy or param_ratio)
        declared = pyinspect.getattr_static(cls, "needs_calibration", False)
        return None if isinstance(declared, property) else bool(declared)


# --- bevel inspect ---------------------------------------------------------------------------------

@app.command("inspect")
def inspect_command(
    model_ref: str = typer.Argument(..., metavar="MODEL",
                                    help="A built-in name (minilm, tinylm) or package.module:callable."),
    graph: bool = typer.Option(False, "--graph", help="Also print the whole graph, one line per node."),
    top: int = typer.Option(10, "--top", min=0, help="How many of the costliest nodes to list."),
    static_shapes: bool = typer.Option(False, "--static-shapes", help=STATIC_SHAPES_HELP),
    explain: Optional[str] = typer.Option(
        None, "--explain", metavar="RULE",
        help="Also say, for every node calling the last op of this pattern rule, whether it matched and if not "
             "which part of the pattern failed on which node (rules: linear, linear.addmm, embedding: the layers "
             "the quantize, prune and lowrank passes act on)."),
) -> None:
    """Capture MODEL with torch.export and print its op histogram, size, FLOPs and costliest nodes."""
    from bevel.compiler.captured import copy_model
    from bevel.compiler.model_ref import resolve_model
    from bevel.ir import analysis
    from bevel.ir.printer import target_text, type_text

    rule = _rule(explain) if explain is not None else None  # a wrong name fails before the model loads
    model, example_inputs = resolve_model(model_ref)
    captured, graph_kind = _capture_for_inspection(copy_model(model), example_inputs, static_shapes)
    console = Console(highlight=False)

    inputs = ", ".join(f"{n.name}: {type_text(n.meta.get('val'))}" for n in captured.inputs())
    console.print(f"[bold]{escape(type(model).__name__)}[/bold] ({escape(model_ref)})  inputs: {escape(inputs)}")
    if graph_kind:
        console.print(graph_kind)
    flops, weight_bytes = analysis.total_flops(captured), analysis.param_bytes(captured)
    console.print(f"parameters:      {analysis.param_count(captured):,}")
    console.print(f"weight bytes:    {weight_bytes:,} ({weight_bytes / 2**20:.2f} MB)")
    console.print(f"FLOPs:           {flops:,} ({flops / 1e9:.3f} G, one call at the example input sizes)")
    console.print(f"weight sparsity: {analysis.weight_sparsity(captured):.1%} of layer weights are zero")

    calls = analysis.op_histogram(captured)
    histogram = Table(title=f"ops ({sum(calls.values())} calls)", title_justify="left")
    histogram.add_column("op", no_wrap=True)
    histogram.add_column("count", justify="right")
    for target, count in calls.items():  # op_histogram gives the most frequent first
        histogram.add_row(escape(target), str(count))
    console.print(histogram)

    per_node = analysis.flops_per_node(captured)
    if top and per_node:
        nodes = {n.name: n for n in captured.nodes(op="call_function")}
        costly = Table(title=f"top {min(top, len(per_node))} nodes by FLOPs", title_justify="left")
        for column in ("node", "op", "output", "FLOPs", "share"):
            costly.add_column(column, no_wrap=True, justify="right" if column in ("FLOPs", "share") else "left")
        for name, count in sorted(per_node.items(), key=lambda item: -item[1])[:top]:
            node = nodes[name]
            costly.add_row(escape(name), escape(target_text(node.target)), escape(type_text(node.meta.get("val"))),
                           f"{count:,}",
                           f"{count / flops:.1%}")
        console.print(costly)
    if rule is not None:
        _print_explanations(console, rule, captured)
    if graph:
        typer.echo(str(captured))


def _check_static_shapes(model: Any, static_shapes: bool) -> None:
    """Refuse --static-shapes for a causal LM by the flag's name (bevel.compile names its own argument)."""
    from bevel.ir.decoder import is_causal_lm

    if static_shapes and is_causal_lm(model):
        raise BevelError("--static-shapes does not apply to a causal LM: its step graph keeps the batch, the tokens "
                         "per step and the cache length symbolic")


def _capture_for_inspection(model: Any, example_inputs: tuple, static_shapes: bool) -> tuple[Any, str]:
    """The graph passes would rewrite: a causal LM's step graph (as ``bevel.compile`` captures it, with
    a note saying so), any other model's forward."""
    from bevel.compiler.compile_decoder import prompt_batch
    from bevel.ir.capture import capture
    from bevel.ir.decoder import capture_decoder, decoder_spec, is_causal_lm

    _check_static_shapes(model, static_shapes)
    if not is_causal_lm(model):
        return capture(model, example_inputs, dynamic_shapes=_dynamic_shapes(static_shapes)), ""
    spec = decoder_spec(model)
    ids, _ = prompt_batch(example_inputs, "the example inputs")
    return capture_decoder(model, spec, ids), ("a causal LM: its step graph (prefill and decode steps, with the KV "
                                                f"cache of {spec.num_layers} layers as inputs), as bevel.compile "
                                                "captures it")


def _rule(name: str) -> Any:
    """The registered pattern rule called ``name``; a usage error naming the known ones otherwise."""
    import difflib

    import bevel.passes  # noqa: F401  (registers the passes and the rules they match with)
    from bevel.ir.rewrite_rule import RULES

    if name not in RULES:
        near = difflib.get_close_matches(name, list(RULES), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise typer.BadParameter(f"unknown rule '{name}'{hint}; known rules: {', '.join(sorted(RULES))}",
                                 param_hint="'--explain'")
    return RULES[name]


def _print_explanations(console: Console, rule_class: Any, captured: Any) -> None:
    """One line per node calling the rule's last op: matched, or why not."""
    from bevel.ir.printer import target_text

    rule = rule_class.for_graph(captured)
    explanations = rule.explain(captured)
    op = target_text(rule.target)
    if not explanations:
        console.print(f"rule {escape(rule.name)}: no node calls {escape(op)}, so nothing can match")
        return
    matched = sum(e.matched for e in explanations)
    # the summary on its own line: as a table title it would wrap to the width of the narrow table
    console.print(f"rule {escape(rule.name)}: {matched} of {len(explanations)} nodes calling {escape(op)} matched")
    table = Table()
    table.add_column("node", no_wrap=True)
    table.add_column("result")
    for e in explanations:
        table.add_row(escape(e.node), escape(e.reason))
    console.print(table)


# --- bevel export ----------------------------------------------------------------------------------

@app.command("export")
def export_command(
    model_ref: str = typer.Argument(..., metavar="MODEL",
                                    help="A built-in name (minilm, tinylm) or package.module:callable."),
    passes: str = typer.Option("cleanup", "--passes", "-p",
                               help='The pipeline, e.g. "cleanup | prune.magnitude(sparsity=0.3)".'),
    out: Path = typer.Option(..., "--out", "-o", file_okay=False,
                             help="Directory to write model.onnx, artifact/ and the reports to."),
    calibration: Optional[str] = typer.Option(
        None, "--calibration", "-c",
        help="Calibration batches: package.module:callable, a .pt file holding a list of input tuples, or 'builtin' "
             "(the built-in model's own; the default for built-in models)."),
    validation: Optional[str] = typer.Option(
        None, "--validation",
        help="Held-out batches no pass reads (package.module:callable or a .pt file, as for --calibration): the "
             "report gives the fidelity on them after each pass. Not for causal LMs."),
    max_fidelity_drop: Optional[float] = typer.Option(
        None, "--max-fidelity-drop", min=0.0, max=2.0,
        help="Roll back any pass that lowers the cosine similarity to the original by more than this (e.g. 0.01)."),
    opset: int = typer.Option(DEFAULT_OPSET, "--opset", min=DEFAULT_OPSET,
                              help="ONNX opset to write: from the default up to the newest the installed onnx knows."),
    device: str = typer.Option("cpu", "--device", help="Where the compiled model runs: cpu or cuda."),
    static_shapes: bool = typer.Option(False, "--static-shapes", help=STATIC_SHAPES_HELP + " The result then "
                                       "accepts only inputs of exactly those sizes."),
) -> None:
    """Compile MODEL with a pipeline and write DIR/model.onnx (its weights in DIR/model.onnx.data beside it),
    DIR/artifact/, DIR/report.md and DIR/report.json."""
    from bevel.codegen.lower import check_device
    from bevel.compiler.manager import check_order
    from bevel.compiler.model_ref import resolve_calibration, resolve_model, resolve_validation
    from bevel.compiler.pipeline import build_pipeline

    pipeline = build_pipeline(passes)  # bad arguments fail before the model loads
    check_device(device)
    check_opset(opset)
    _check_output_dir(out)
    batches = resolve_calibration(calibration, model_ref)
    held_out = resolve_validation(validation)
    check_order(pipeline, has_calibration=bool(batches))
    model, example_inputs = resolve_model(model_ref, example_inputs=batches[0] if batches else None)
    _check_static_shapes(model, static_shapes)
    made = _make_output_dir(out)  # before the compile: a directory that cannot be made fails first
    try:
        compiled = _compile_with_progress(model, pipeline, example_inputs, batches, device=device,
                                          max_fidelity_drop=max_fidelity_drop, validation=held_out,
                                          dynamic_shapes=_dynamic_shapes(static_shapes))
    except BaseException:
        for directory in made:  # leave nothing behind where nothing was written (if nothing else did)
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    report = compiled.report
    paths = {"report": out / "report.md", "report json": out / "report.json", "artifact": out / "artifact",
             "onnx": out / "model.onnx"}
    paths["report"].write_text(report.to_markdown())
    report.save_json(str(paths["report json"]))
    err = Console(stderr=True, highlight=False)
    with err.status("saving the artifact"):
        compiled.save(str(paths["artifact"]))
    weights = paths["onnx"].with_name(paths["onnx"].name + ".data")
    for stale in (paths["onnx"], weights):  # an earlier export's, which a failed one would leave beside the artifact
        stale.unlink(missing_ok=True)
    with err.status(f"exporting ONNX (opset {opset})"):
        try:
            compiled.export_onnx(str(paths["onnx"]), opset=opset)
        except ExportError as error:  # the artifact and reports are written and usable: say so
            raise ExportError(f"{first_line(str(error))} (written: {paths['artifact']}, {paths['report']}, "
                              f"{paths['report json']})") from error

    if weights.exists():  # the exporter keeps the weights in a file beside the graph: it travels with it
        paths["onnx weights"] = weights
    typer.echo(str(report))
    typer.echo("")
    for label, path in paths.items():
        typer.echo(f"{label + ':':13} {path}")


# what export writes in DIR, and whether each is a directory
OUTPUTS = {"model.onnx": False, "artifact": True, "report.md": False, "report.json": False}


def _check_output_dir(out: Path) -> None:
    """A BevelError, before any work, where ``out`` cannot be created (below a file, or below a
    directory this user cannot write; an existing file is refused by the option itself) or holds
    something of the other kind where an output goes (a file named ``artifact``)."""
    if out.exists():
        if not os.access(out, os.W_OK):
            raise BevelError(f"--out '{out}': the directory is not writable")
        for name, is_dir in OUTPUTS.items():
            path = out / name
            if path.exists() and path.is_dir() != is_dir:
                kind = "a directory" if is_dir else "a file"
                raise BevelError(f"--out '{out}': '{path}' exists and is not {kind}, which export writes there")
        return
    parent = next(p for p in out.absolute().parents if p.exists())
    if not parent.is_dir():
        raise BevelError(f"--out '{out}': '{parent}' is a file, not a directory")
    if not os.access(parent, os.W_OK):
        raise BevelError(f"--out '{out}': cannot create the directory in '{parent}' (not writable)")


def _make_output_dir(out: Path) -> list[Path]:
    """Create ``out`` and its missing parents; the directories made, deepest first."""
    absolute = Path(os.path.abspath(out))  # ".." resolved, so that each directory made is named once
    made = [p for p in (absolute, *absolute.parents) if not p.exists()]
    try:
        absolute.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BevelError(f"--out '{out}': cannot create the directory: {error.strerror or error}") from None
    return made


def _dynamic_shapes(static_shapes: bool) -> str | None:
    """The ``dynamic_shapes`` argument of capture and bevel.compile for ``--static-shapes``."""
    return "static" if static_shapes else None


def _compile_with_progress(model: Any, pipeline: Any, example_inputs: Any, calibration: Any, **options: Any) -> Any:
    """bevel.compile with a progress bar on stderr: one step per pass, a line per finished pass."""
    console = Console(stderr=True, highlight=False)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(escape(f"capturing {type(model).__name__}"), total=len(pipeline))

        def on_start(index: int, count: int, p: Any) -> None:
            progress.update(task, description=escape(f"pass {index + 1}/{count}: {p!r}"))

        def on_end(index: int, count: int, p: Any, entry: Any) -> None:
            reason = f" ({entry.reason})" if entry.reason else ""
            progress.console.print(escape(f"{entry.name}: {entry.status} in {entry.seconds:.2f} s{reason}"))
            progress.advance(task)

        return bevel.compile(model, pipeline, example_inputs=example_inputs, calibration=calibration,
                             on_pass_start=on_start, on_pass_end=on_end, **options)


# --- bevel demo ------------------------------------------------------------------------------------

@app.command("demo")
def demo_command(
    passes: str = typer.Option(DEMO_PIPELINE, "--passes", "-p", help="The pipeline to compile MiniLM with."),
    runs: int = typer.Option(10, "--runs", min=1, help="Timed runs of each model (the median is reported)."),
    warmup: int = typer.Option(3, "--warmup", min=0, help="Untimed runs of each model before timing."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Sentences per timed batch."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1,
                                          help="CPU threads torch may use (default: torch's own choice)."),
) -> None:
    """Compile the built-in MiniLM (real weights, real sentences), print the report, then time it
    against the original."""
    import torch

    from bevel.compiler.model_ref import resolve_calibration, resolve_model
    from bevel.compiler.pipeline import build_pipeline
    from bevel.data import sentences
    from bevel.models.minilm import encode
    from bevel.runtime.timing import median_latencies_ms

    pipeline = build_pipeline(passes)
    if threads is not None:
        torch.set_num_threads(threads)
    model, example_inputs = resolve_model("minilm")
    compiled = _compile_with_progress(model, pipeline, example_inputs, resolve_calibration("builtin", "minilm"))
    typer.echo(str(compiled.report))

    batch = encode(sentences(batch_size, seed=7))  # sentences neither captured nor calibrated on
    latencies = median_latencies_ms({"original": model.eval(), "compiled": compiled}, batch, runs=runs, warmup=warmup)
    original_ms, compiled_ms = latencies["original"], latencies["compiled"]
    fidelity = compiled.report.fidelity
    cosine = f"{fidelity.cosine:.4f}" if fidelity else "n/a"
    typer.echo("")
    typer.echo(f"latency on {batch_size} sentences x {batch[0].shape[1]} tokens, median of {runs} runs after "
               f"{warmup} warm-up ({torch.get_num_threads()} CPU threads):")
    typer.echo(f"  original {original_ms:8.2f} ms")
    typer.echo(f"  bevel    {compiled_ms:8.2f} ms")
    typer.echo(f"  speedup {original_ms / compiled_ms:.2f}x   fidelity (cosine vs original on calibration "
               f"batches): {cosine}")


# --- entry point -----------------------------------------------------------------------------------

def _fail(message: str, code: int = 2) -> None:
    text = message if message.startswith("error: ") else f"error: {message}"
    print(text, file=sys.stderr)
    sys.exit(code)


def main() -> None:
    """Console-script entry point: ``bevel ...``."""
    app(prog_name="bevel")


if __name__ == "__main__":
    main()
