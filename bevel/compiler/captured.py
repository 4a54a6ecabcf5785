"""``bevel.capture``: capture a model once, then compile it with several pipelines.

torch.export is the same work for every pipeline, and not small (seconds for the step graph of a
12-layer causal LM, its batch, token and cache dimensions symbolic). A sweep over a pass's
parameters (thresholds, ratios, budgets) captures once and hands the result to ``bevel.compile``
in place of the model, once per point::

    captured = bevel.capture(model, example_inputs=(ids, mask))
    for ratio in (0.1, 0.2, 0.3):
        cm = bevel.compile(captured, f"prune.structured(ratio={ratio})", calibration=batches)

Each compile rewrites its own copy of the captured graph and measures fidelity against the copy of
the model the graph was captured from, so the result equals compiling the model itself, and the
captured model, the graph's code, weights and metadata stay as they were for the next compile. What
the compiles share is torch.export's record of the symbolic sizes (its ShapeEnv, which fake tensors
cannot be copied away from), as the passes of one compile share it: sizes that a pass's shape
propagation creates (a token merge's output length) accumulate there.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch

from bevel.compiler.compile_decoder import prompt_batch
from bevel.compiler.fidelity import copied
from bevel.errors import BevelError, CaptureError, ParamError, first_line
from bevel.ir.capture import capture as capture_graph
from bevel.ir.decoder import DecoderStep, capture_decoder, decoder_spec, is_causal_lm, prefill_inputs
from bevel.ir.graph import Graph


@dataclass(frozen=True, eq=False)
class CapturedModel:
    """A model's graph as torch.export captured it, with the copy of the model it was captured from
    (in eval mode: the reference each compile's fidelity check runs). Made by :func:`capture`; give
    it to ``bevel.compile`` in place of the model (see the module docstring for what compiles share)."""

    model: torch.nn.Module
    graph: Graph
    example_inputs: tuple[Any, ...]
    decoder: bool  # a causal LM captured as its step graph with a KV cache (compiles to a CompiledDecoder)
    capture_seconds: float

    def __repr__(self) -> str:
        kind = "decoder step graph" if self.decoder else "graph"
        return (f"CapturedModel({type(self.model).__name__}, {kind} of {len(self.graph.fx_graph.nodes)} nodes, "
                f"captured in {self.capture_seconds:.1f} s)")


def copy_model(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy in eval mode, so capture and passes never touch the user's model."""
    try:
        clone = copy.deepcopy(model)
    except Exception as error:  # deepcopy fails on some attributes (locks, handles): say which model
        raise CaptureError(f"could not copy {type(model).__name__} before capture ({error}); bevel never "
                           f"modifies the user's model, so it needs a copyable one") from error
    return clone.eval()


def plain_forward_copy(model: torch.nn.Module) -> torch.nn.Module:
    """:func:`copy_model` for a model captured as its plain forward: an HF model's copy (a causal LM, a
    decoder backbone) is told not to return its KV cache (``config.use_cache = False``), since a cache
    object is no output a graph can have."""
    clone = copy_model(model)
    if getattr(getattr(clone, "config", None), "use_cache", False) is True:
        clone.config.use_cache = False
    return clone


def as_input_tuple(batch: Any, what: str) -> tuple[Any, ...]:
    """A model's positional inputs as a tuple: a lone tensor becomes a 1-tuple."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)):
        return tuple(batch)
    raise BevelError(f"{what} must be a tuple of positional inputs (or one tensor), got {type(batch).__name__}")


def check_examples_not_empty(example_inputs: tuple[Any, ...], dynamic_shapes: Any) -> None:
    """Refuse example tensors with a dimension of size 0 where sizes should vary (``dynamic_shapes``
    None): torch.export fixes such a dimension, so the graph would take only empty inputs, and the
    fidelity checks would compare nothing."""
    if dynamic_shapes is not None:
        return
    for index, leaf in enumerate(torch.utils._pytree.tree_leaves(example_inputs)):
        if isinstance(leaf, torch.Tensor) and 0 in leaf.shape:
            raise BevelError(f"example input tensor {index} has shape {list(leaf.shape)}: a dimension of size 0 "
                             f"would be fixed into the graph (it would take only empty inputs) and nothing could be "
                             f"checked on it; give example inputs that are not empty")


def check_dynamic_shapes(dynamic_shapes: Any) -> None:
    """Refuse a ``dynamic_shapes`` that is not None, "static" or a torch.export spec (dict, tuple, list)."""
    if dynamic_shapes is not None and dynamic_shapes != "static" and not isinstance(dynamic_shapes,
                                                                                     (dict, tuple, list)):
        raise ParamError(f"dynamic_shapes={dynamic_shapes!r} must be None (dimensions vary where the model allows), "
                         f"'static' (fixed to the example inputs) or a torch.export dynamic_shapes spec (a dict, "
                         f"tuple or list)", key="dynamic_shapes")


def as_decoder(model: torch.nn.Module, decoder: bool | None, dynamic_shapes: Any) -> bool:
    """Whether ``model`` is captured as a decoder step graph: a causal LM unless ``decoder=False``;
    ``decoder=True`` refuses any other model."""
    if decoder is not None and not isinstance(decoder, bool):
        raise ParamError(f"decoder={decoder!r} must be None or True (a causal LM becomes a decoder with generate()) "
                         f"or False (capture its plain forward)", key="decoder")
    if decoder and not is_causal_lm(model):
        raise BevelError(f"decoder=True: {type(model).__name__} is not a causal LM (an HF ...ForCausalLM or "
                         f"...LMHeadModel)")
    if decoder is False or not is_causal_lm(model):
        return False
    if dynamic_shapes is not None:
        raise BevelError("dynamic_shapes does not apply to a causal LM: its step graph keeps the batch, the "
                         "tokens per step and the cache length symbolic")
    return True


def capture(model: torch.nn.Module, example_inputs: Any, dynamic_shapes: Any = None,
            decoder: bool | None = None) -> CapturedModel:
    """Capture ``model`` once, for several ``bevel.compile`` calls (give them the result in place of
    the model, without ``example_inputs``, ``dynamic_shapes`` or ``decoder``: those are fixed here).

    Args:
        model: the nn.Module; it is copied, never modified.
        example_inputs: a tuple of positional inputs to capture it with (a lone tensor is accepted);
            they are also what its compiles take as example inputs. A causal LM's are a prompt:
            ``input_ids`` or ``(input_ids, attention_mask)``.
        dynamic_shapes: as in ``bevel.compile``: None (dimensions vary where the model allows it),
            "static", or a torch.export dynamic_shapes spec.
        decoder: as in ``bevel.compile``: None or True (a causal LM is captured as its step graph with a
            KV cache), or False (its plain forward).

    A causal LM's step graph is captured on the prompt cut to the model's maximum positions minus
    two tokens, as ``bevel.compile`` does with its default ``max_cache_len``.

    Raises CaptureError when the model cannot be copied, fails on its example inputs, or torch.export
    fails (naming the line).
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"bevel.capture expects a torch.nn.Module, got {type(model).__name__}")
    if example_inputs is None:
        raise BevelError("bevel.capture needs example_inputs=(...): the inputs to capture the model with")
    # a copy, so that changing the user's tensors later does not change what the compiles take as examples
    example_inputs = copied(as_input_tuple(example_inputs, "example_inputs"))
    check_dynamic_shapes(dynamic_shapes)
    is_decoder = as_decoder(model, decoder, dynamic_shapes)
    if not is_decoder:  # a decoder's prompts are checked as prompts
        check_examples_not_empty(example_inputs, dynamic_shapes)
    spec = decoder_spec(model) if is_decoder else None
    prompt = prompt_batch(example_inputs, "example_inputs") if is_decoder else None
    original = copy_model(model) if is_decoder else plain_forward_copy(model)
    try:  # as bevel.compile does before capture: a model that fails by itself is named as such
        with torch.no_grad():
            if is_decoder:
                DecoderStep(original, spec)(*prefill_inputs(spec, *prompt))
            else:
                original(*example_inputs)
    except Exception as error:  # models raise assorted types
        raise CaptureError(f"{type(model).__name__} fails on its example inputs before capture: "
                           f"{type(error).__name__}: {first_line(error)}") from error
    start = time.perf_counter()
    if is_decoder:
        graph = capture_decoder(original, spec, prompt[0])
    else:
        graph = capture_graph(original, example_inputs, dynamic_shapes)
    return CapturedModel(original, graph, example_inputs, is_decoder, time.perf_counter() - start)
