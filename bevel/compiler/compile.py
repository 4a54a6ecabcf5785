"""``bevel.compile``: capture a model, run a pipeline of passes over its graph, and return a CompiledModule."""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Iterable

import torch
from torch.utils._pytree import tree_flatten

from bevel.codegen.lower import check_device, lower
from bevel.compiler.captured import (CapturedModel, as_decoder, as_input_tuple, check_dynamic_shapes,
                                     check_examples_not_empty, copy_model, plain_forward_copy)
from bevel.compiler.compile_decoder import compile_decoder
from bevel.compiler.fidelity import Fidelity, HeldOut, compare, copied, run_batches
from bevel.compiler.manager import PassManager, ProgressHook, check_order, measure_figures
from bevel.compiler.pipeline import build_pipeline
from bevel.compiler.report import Report
from bevel.errors import BevelError, CaptureError, ParamError, first_line
from bevel.ir.capture import capture
from bevel.ir.graph import Graph
from bevel.passes.base import Pass, PassContext
from bevel.passes.tome.blocks import padding_mask_input
from bevel.runtime.compiled_module import CompiledModule


def _run_each(module: Any, batches: list[tuple[Any, ...]],
              failure: Callable[[int, tuple[Any, ...], str], str]) -> list:
    """The outputs of ``module`` on every batch; the first batch it cannot take is a CaptureError whose
    message ``failure(index, batch, "ErrorType: first line")`` writes."""
    outputs = []
    for index, batch in enumerate(batches):
        try:
            outputs.extend(run_batches(module, [batch]))
        except Exception as error:  # guards and shape checks raise assorted types
            raise CaptureError(failure(index, batch, f"{type(error).__name__}: {first_line(error)}")) from error
    return outputs


def _shapes(batch: tuple[Any, ...]) -> list:
    """Each input's shape, or its type where it is not a tensor (for error messages)."""
    return [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in batch]


def _padding_masks(batches: list[tuple[Any, ...]], padding: int) -> list[torch.Tensor]:
    """Each batch's padding mask: its flat input at position ``padding``."""
    return [tree_flatten(batch)[0][padding] for batch in batches]


def check_seed(seed: Any) -> None:
    """Refuse a ``seed`` that torch.manual_seed cannot take: not an int, or outside 64 bits."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**64:
        raise ParamError(f"seed={seed!r} must be an integer that fits in 64 bits", key="seed")


def check_fidelity_budget(max_fidelity_drop: Any) -> None:
    """Refuse a ``max_fidelity_drop`` that is not None or a number in [0, 2] (a drop in cosine similarity)."""
    if max_fidelity_drop is not None and (isinstance(max_fidelity_drop, bool)
                                          or not isinstance(max_fidelity_drop, (int, float))
                                          or not 0.0 <= max_fidelity_drop <= 2.0):
        raise ParamError(f"max_fidelity_drop={max_fidelity_drop!r} must be a number in [0, 2] "
                         f"(a drop in cosine similarity)", key="max_fidelity_drop")


# more calibration batches than any pass reads (each is run several times per compile); an iterable
# that gives more is taken for an endless one (a cycling data loader), which would never be read out
MAX_CALIBRATION_BATCHES = 4096


def calibration_batches(calibration: Iterable[Any] | None, what: str = "calibration") -> list[tuple[Any, ...]]:
    """The calibration batches as a list of input tuples (empty for None); ``what`` names them in errors."""
    if calibration is None:
        return []
    if isinstance(calibration, (torch.Tensor, str, bytes)) or not isinstance(calibration, Iterable):
        raise BevelError(f"{what} must be an iterable of input tuples (a list of batches), "
                         f"got {type(calibration).__name__}")
    batches = list(itertools.islice(calibration, MAX_CALIBRATION_BATCHES + 1))
    if len(batches) > MAX_CALIBRATION_BATCHES:
        raise BevelError(f"{what} gave more than {MAX_CALIBRATION_BATCHES} batches (an endless iterator?): give a "
                         f"list of batches, e.g. list(itertools.islice(batches, 32))")
    return [as_input_tuple(batch, f"{what}: batch {index}") for index, batch in enumerate(batches)]


def captured_outputs(graph: Graph, batches: list[tuple[Any, ...]], what: str = "calibration") -> list:
    """The captured graph's outputs on ``batches``; one it cannot take is a CaptureError naming it."""
    return _run_each(graph, batches, lambda index, batch, error: (
        f"the captured graph fails on {what} batch {index} (input shapes {_shapes(batch)}): {error} (a batch "
        f"whose shapes differ from the example inputs' must fit the shapes the graph was captured with)"))


def check_graph_runs(graph: Graph, batches: list[tuple[Any, ...]], reference: list) -> Fidelity:
    """Run the captured graph on every calibration batch before any pass; its fidelity to the eager
    model should be exact. A batch it cannot take (shapes fixed by ``dynamic_shapes="static"`` or by
    the model) is a user error, named here rather than blamed on every pass."""
    outputs = captured_outputs(graph, batches)
    try:
        return compare(reference, outputs)
    except ValueError as error:  # the captured graph returns other outputs than the model
        raise CaptureError(f"the captured graph does not reproduce the model's outputs: {error}") from error


def compile(model: torch.nn.Module | CapturedModel, passes: str | Pass | list[str | Pass] = "cleanup",
            example_inputs: Any = None, calibration: Iterable[Any] | None = None, device: str = "cpu",
            max_fidelity_drop: float | None = None, dynamic_shapes: Any = None, seed: int = 0,
            on_pass_start: ProgressHook | None = None, on_pass_end: ProgressHook | None = None,
            max_cache_len: int | None = None, eval_text: Any = None, decoder: bool | None = None,
            validation: Iterable[Any] | None = None) -> CompiledModule:
    """Rewrite ``model`` with the pipeline ``passes`` and return a CompiledModule to call, save or export.

    Args:
        model: the nn.Module to optimize; it is copied, never modified (nor are the input tensors
            given: it runs on copies). Or a CapturedModel from ``bevel.capture``, to compile a model
            captured once with several pipelines: then
            ``example_inputs``, ``dynamic_shapes`` and ``decoder`` are the capture's and not given here.
        passes: a pipeline string (``"cleanup | prune.magnitude(sparsity=0.3)"``), a Pass, or a list
            of strings and Pass instances. Errors in it are raised before any work.
        example_inputs: a tuple of positional inputs used to capture the graph (a lone tensor is
            accepted). Defaults to the first calibration batch.
        calibration: an iterable of input tuples; the fidelity check compares the rewritten graph with
            the original model on them, and calibrating passes read them. Defaults to the example inputs.
        device: where the compiled module runs ("cpu" or "cuda").
        max_fidelity_drop: the largest accepted drop in cosine similarity against the original model
            (0.01 = outputs keep a cosine of at least 0.99); a pass that goes beyond it is rolled back
            and the report says why. None disables the budget.
        dynamic_shapes: None (input dimensions may vary where the model allows it), "static", or a
            torch.export dynamic_shapes spec.
        seed: seed set before each pass, for passes that sample.
        on_pass_start, on_pass_end: progress callbacks ``(index, count, pass[, report_entry])``.
        max_cache_len: causal LMs only: the KV cache's length per sequence (prompt plus generated
            tokens); defaults to the model's maximum position count.
        eval_text: causal LMs only: held-out text (a str of UTF-8 bytes for byte-level models, or a
            tensor of token ids) whose perplexity the report gives for the original model and after
            each applied pass.
        decoder: None or True (a causal LM becomes a CompiledDecoder; True refuses other models), or
            False to capture a causal LM's plain forward instead (tokens -> logits, no cache):
            structured pruning of attention heads needs that graph, since a decoder's cache inputs
            fix its KV head count.
        validation: held-out input batches (like calibration's) that no pass reads: the report gives
            the fidelity on them (``held-out cosine``, the smallest per-sample cosine to the original
            model, and ``held-out top-1`` for logits) after capture and after each applied pass, beside
            the calibration figures. Passes that fit layers to the calibration batches (GPTQ, the
            refits of ``prune.structured`` and ``lowrank``) look better on those than on new inputs.
            The fidelity budget stays on the calibration batches. Not for causal LMs (``eval_text``
            gives their held-out perplexity).

    A causal LM (an HF ``...ForCausalLM`` or ``...LMHeadModel``) is captured as a step graph with an
    explicit KV cache and comes back as a CompiledDecoder with ``generate()``; its example inputs
    and calibration batches are prompts: ``input_ids`` or ``(input_ids, attention_mask)``.
    """
    pipeline = build_pipeline(passes)
    captured = model if isinstance(model, CapturedModel) else None
    if captured is not None:
        given = [name for name, value in (("example_inputs", example_inputs), ("dynamic_shapes", dynamic_shapes),
                                          ("decoder", decoder)) if value is not None]
        if given:
            raise BevelError(f"{', '.join(given)}: fixed when the model was captured (bevel.capture); to change it, "
                             f"capture again or compile the model itself")
        model, example_inputs = captured.model, captured.example_inputs
    elif not isinstance(model, torch.nn.Module):
        raise CaptureError(f"bevel.compile expects a torch.nn.Module, got {type(model).__name__}")
    check_fidelity_budget(max_fidelity_drop)
    check_seed(seed)
    check_dynamic_shapes(dynamic_shapes)
    is_decoder = captured.decoder if captured is not None else as_decoder(model, decoder, dynamic_shapes)
    check_device(device)
    batches = calibration_batches(calibration)
    held_out = [copied(batch) for batch in calibration_batches(validation, what="validation")]
    if example_inputs is None:
        if not batches:
            raise BevelError("bevel.compile needs example_inputs=(...) (or calibration batches) to capture the model")
        example_inputs = batches[0]
    # the user's tensors are never written: a model that changes its inputs in place changes copies
    example_inputs = copied(as_input_tuple(example_inputs, "example_inputs"))
    if captured is None and not is_decoder:  # a decoder's prompts are checked as prompts
        check_examples_not_empty(example_inputs, dynamic_shapes)
    batches = [copied(batch) for batch in batches]
    check_order(pipeline, has_calibration=bool(batches))
    if is_decoder and validation is not None:
        raise BevelError(f"validation batches apply to models that are not causal LMs; {type(model).__name__} is "
                         f"compiled as a decoder: give eval_text for its held-out perplexity instead")
    # a captured model is already a copy: its compiles only run it, and rewrite a copy of its graph
    if is_decoder:
        return compile_decoder(copy_model(model) if captured is None else captured.model, pipeline, example_inputs,
                               batches, device, max_fidelity_drop, seed, max_cache_len, eval_text, on_pass_start,
                               on_pass_end,
                               None if captured is None else (captured.graph.copy(), captured.capture_seconds))
    if max_cache_len is not None or eval_text is not None:
        raise BevelError(f"max_cache_len and eval_text apply to causal LMs only; {type(model).__name__} is not one")
    ctx = PassContext(calibration=batches or [example_inputs], example_inputs=example_inputs, device=device,
                      calibrated=bool(batches),
                      seed=seed, max_fidelity_drop=max_fidelity_drop)
    original = plain_forward_copy(model) if captured is None else captured.model
    reference = _run_each(original, ctx.calibration, lambda index, batch, error: (
        f"{type(model).__name__} fails on "
        + (f"calibration batch {index} (input shapes {_shapes(batch)})" if batches else "its example inputs")
        + f" before capture: {error}"))
    held_out_reference = _run_each(original, held_out, lambda index, batch, error: (
        f"{type(model).__name__} fails on validation batch {index} (input shapes {_shapes(batch)}) before capture: "
        f"{error}"))
    if captured is None:
        start = time.perf_counter()
        graph = capture(original, example_inputs, dynamic_shapes)
        capture_seconds = time.perf_counter() - start
    else:
        graph, capture_seconds = captured.graph.copy(), captured.capture_seconds
    report = Report(model=type(model).__name__, pipeline=" | ".join(repr(p) for p in pipeline),
                    original=measure_figures(graph), capture_seconds=capture_seconds,
                    calibration_batches=len(ctx.calibration), max_fidelity_drop=max_fidelity_drop,
                    capture_fidelity=check_graph_runs(graph, ctx.calibration, reference))
    # outputs at an encoder's padded positions mean nothing: every pass's fidelity check skips them
    padding = padding_mask_input(graph)
    if padding is not None:
        ctx.padding_masks = _padding_masks(ctx.calibration, padding)
    validation_set = None
    if held_out:
        validation_set = HeldOut(held_out, held_out_reference,
                                 None if padding is None else _padding_masks(held_out, padding))
        report.quality = validation_set.quality(captured_outputs(graph, held_out, "validation"))
    manager = PassManager(pipeline, ctx, reference, on_start=on_pass_start, on_end=on_pass_end,
                          held_out=validation_set)
    graph, report.passes = manager.run(graph)
    return CompiledModule(lower(graph, device), example_inputs, report, report.pipeline)
