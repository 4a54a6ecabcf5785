"""``bevel.compile`` for causal LMs: capture the step graph with its KV cache, run the pipeline on
it, and return a :class:`~bevel.runtime.compiled_decoder.CompiledDecoder`.

Calibration batches are prompts (``input_ids`` or ``(input_ids, attention_mask)``); each becomes a
prefill step, so the fidelity check compares the logits and the filled cache with the original
model's. With ``eval_text``, the report also gives the held-out perplexity of the original model
and after each pass.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from bevel.codegen.lower import lower
from bevel.compiler.fidelity import run_batches
from bevel.compiler.manager import PassManager, ProgressHook, measure_figures
from bevel.compiler.report import Report
from bevel.errors import BevelError, CaptureError
from bevel.ir.decoder import DecoderSpec, DecoderStep, capture_decoder, decoder_spec, prefill_inputs
from bevel.ir.graph import Graph
from bevel.passes.base import Pass, PassContext
from bevel.runtime.compiled_decoder import CompiledDecoder


def prompt_batch(batch: tuple[Any, ...], what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(input_ids, attention_mask or None)`` of one prompt batch, checked."""
    if not 1 <= len(batch) <= 2 or not all(isinstance(x, torch.Tensor) for x in batch):
        raise BevelError(f"{what} of a causal LM must be input_ids or (input_ids, attention_mask) tensors, "
                         f"got {len(batch)} items")
    ids = batch[0]
    if ids.dim() != 2 or ids.shape[1] == 0 or ids.shape[0] == 0 or ids.is_floating_point():
        raise BevelError(f"{what}: input_ids must be a non-empty integer tensor [batch, tokens], "
                         f"got {ids.dtype} {tuple(ids.shape)}")
    mask = batch[1] if len(batch) == 2 else None
    if mask is not None and mask.shape != ids.shape:
        raise BevelError(f"{what}: attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
    return ids, mask


def compile_decoder(model: torch.nn.Module, pipeline: list[Pass], example_inputs: tuple[Any, ...],
                    batches: list[tuple[Any, ...]], device: str, max_fidelity_drop: float | None, seed: int,
                    max_cache_len: int | None, eval_text: Any, on_pass_start: ProgressHook | None,
                    on_pass_end: ProgressHook | None,
                    captured: tuple[Graph, float] | None = None) -> CompiledDecoder:
    """The decoder branch of ``bevel.compile`` (``model`` is already a copy in eval mode); ``captured``
    is the step graph of ``model`` (a copy to rewrite) and the seconds its capture took, if captured
    already."""
    spec = decoder_spec(model, max_cache_len)
    quality = _perplexity_probe(eval_text, spec)
    example_ids, example_mask = prompt_batch(example_inputs, "example_inputs")
    prompts = ([prompt_batch(b, f"calibration batch {i}") for i, b in enumerate(batches)]
               or [(example_ids, example_mask)])
    for ids, _ in prompts:
        if ids.shape[1] > spec.max_cache_len:
            raise BevelError(f"a calibration prompt of {ids.shape[1]} tokens does not fit max_cache_len="
                             f"{spec.max_cache_len}")
    steps = [prefill_inputs(spec, ids, mask) for ids, mask in prompts]
    ctx = PassContext(calibration=steps, example_inputs=steps[0], device=device, calibrated=bool(batches),
                      seed=seed, max_fidelity_drop=max_fidelity_drop, max_cache_len=spec.max_cache_len)
    eager_step = DecoderStep(model, spec)
    try:
        reference = run_batches(eager_step, steps)
    except Exception as error:
        raise CaptureError(f"{type(model).__name__} fails on its own prompts with a KV cache: "
                           f"{type(error).__name__}: {error}") from error
    if captured is None:
        start = time.perf_counter()
        graph = capture_decoder(model, spec, example_ids)
        capture_seconds = time.perf_counter() - start
    else:
        graph, capture_seconds = captured
    from bevel.compiler.compile import check_graph_runs

    report = Report(model=type(model).__name__, pipeline=" | ".join(repr(p) for p in pipeline),
                    original=measure_figures(graph), capture_seconds=capture_seconds,
                    calibration_batches=len(steps), max_fidelity_drop=max_fidelity_drop,
                    capture_fidelity=check_graph_runs(graph, steps, reference))
    if quality is not None:
        report.quality = {"perplexity": quality(model)}
    manager = PassManager(pipeline, ctx, reference, on_start=on_pass_start, on_end=on_pass_end,
                          evaluate=None if quality is None else _graph_quality(quality, spec))
    graph, report.passes = manager.run(graph)
    spec = spec.with_kv_heads_of(graph)  # prune.structured may have removed KV heads
    example = prefill_inputs(spec, example_ids, example_mask)
    return CompiledDecoder(lower(graph, device), example, report, report.pipeline, spec)


def _perplexity_probe(eval_text: Any, spec: DecoderSpec):
    """A function model -> held-out perplexity of ``eval_text`` (None when no text is given); the
    text is checked here, before capture, and its ids against the model's vocabulary."""
    if eval_text is None:
        return None
    from bevel.eval.perplexity import perplexity, token_ids

    is_ids = isinstance(eval_text, torch.Tensor) and not eval_text.is_floating_point()
    if not (isinstance(eval_text, str) or is_ids):
        kind = type(eval_text).__name__ + (f" {eval_text.dtype}" if isinstance(eval_text, torch.Tensor) else "")
        raise BevelError(f"eval_text must be a str (scored as UTF-8 bytes) or an integer tensor of token ids, "
                         f"got {kind}")
    ids = token_ids(eval_text, None)
    if ids.numel() < 2:
        raise BevelError("eval_text must hold at least two tokens")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= spec.vocab_size:
        raise BevelError(f"eval_text holds token id {low if low < 0 else high}, outside the model's vocabulary of "
                         f"{spec.vocab_size} tokens (ids 0 to {spec.vocab_size - 1})")
    context = min(512, ids.numel())
    return lambda model: perplexity(model, ids, context=context, stride=min(256, context))


def _graph_quality(quality, spec):
    """``quality`` applied to a step graph after a pass (through a throw-away CompiledDecoder)."""
    def evaluate(graph) -> dict[str, float]:
        probe = CompiledDecoder(graph.module, graph.example_inputs, report=None, pipeline="",
                                spec=spec.with_kv_heads_of(graph))
        return {"perplexity": quality(probe)}

    return evaluate
