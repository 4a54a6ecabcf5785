"""The two ops of confidence-based early exit, ``bevel::early_exit_decide`` and
``bevel::early_exit_freeze``, with their references, fakes and ONNX translations.

Each token (or sample) carries an exit depth: the number of blocks it runs, ``total`` until it exits.

- ``early_exit_decide(logits, depth, threshold, exit_depth, criterion, shared)``: after block
  ``exit_depth - 1``, the prediction of the model's own head on the hidden state there gives each
  token a confidence (``criterion``: the largest softmax probability, or the margin between the two
  largest); a token not yet exited whose confidence is above ``threshold`` gets ``exit_depth``. With
  ``shared`` (SkipDecode), a position exits only when every row of the batch is confident there, and
  once a position has exited every later position has too (a running maximum along the sequence), so
  exit depths never rise along the sequence.
- ``early_exit_freeze(hidden_in, hidden_out, depth, block)``: the hidden state after block
  ``block``: its output for tokens still running, its input for tokens that exited before it
  (``depth <= block``). An exited token's hidden state is thereby carried unchanged to the head, and
  the blocks it skips still compute its keys and values from it (the KV cache entries later tokens
  attend to: CALM's state copying).

Both are elementwise over the batch and the sequence, cheap next to a block, and written in plain
torch that runs on any device, so they have no Triton kernel. Their ONNX translations use standard
opset-18 ops (``Softmax``, ``ReduceMax``, ``TopK``, ``Where``, ``CumSum``).
"""

from __future__ import annotations

import onnx_ir as ir
import torch
from onnxscript import opset18 as op
from onnxscript.onnx_types import TensorType

CRITERIA = ("max_prob", "margin")


def exit_confidence(logits: torch.Tensor, criterion: str) -> torch.Tensor:
    """The confidence of each prediction [..., classes] -> [...] in float32: the largest softmax
    probability (``"max_prob"``) or the difference of the two largest (``"margin"``)."""
    probabilities = logits.float().softmax(dim=-1)
    if criterion == "max_prob":
        return probabilities.amax(dim=-1)
    if criterion == "margin":
        top = probabilities.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]
    raise ValueError(f"unknown early-exit criterion {criterion!r}; expected one of {CRITERIA}")


def decide_reference(logits: torch.Tensor, depth: torch.Tensor, threshold: float, exit_depth: int,
                     criterion: str, shared: bool) -> torch.Tensor:
    """The exit depths after the exit point ``exit_depth`` (see the module docstring); ``depth``
    has the shape of ``logits`` without its last dimension."""
    exited_before = depth < exit_depth
    exits = (exit_confidence(logits, criterion) > threshold) | exited_before
    if shared:
        exits = exits.all(dim=0, keepdim=True).expand_as(exits)
        if exits.dim() >= 2:  # a position exits once any earlier one has: depths never rise along it
            exits = exits.to(torch.int8).cummax(dim=1).values.bool()
    return torch.where(exits & ~exited_before, torch.full_like(depth, exit_depth), depth)


def freeze_reference(hidden_in: torch.Tensor, hidden_out: torch.Tensor, depth: torch.Tensor,
                     block: int) -> torch.Tensor:
    """``hidden_out`` where a token still runs block ``block``, ``hidden_in`` where it exited before it."""
    frozen = (depth <= block).reshape(*depth.shape, *([1] * (hidden_out.dim() - depth.dim())))
    return torch.where(frozen, hidden_in, hidden_out)


@torch.library.custom_op("bevel::early_exit_decide", mutates_args=())
def early_exit_decide(logits: torch.Tensor, depth: torch.Tensor, threshold: float, exit_depth: int,
                      criterion: str, shared: bool) -> torch.Tensor:
    """See :func:`decide_reference`."""
    return decide_reference(logits, depth, threshold, exit_depth, criterion, shared)


@early_exit_decide.register_fake
def _(logits: torch.Tensor, depth: torch.Tensor, threshold: float, exit_depth: int, criterion: str,
      shared: bool) -> torch.Tensor:
    return torch.empty_like(depth)


@torch.library.custom_op("bevel::early_exit_freeze", mutates_args=())
def early_exit_freeze(hidden_in: torch.Tensor, hidden_out: torch.Tensor, depth: torch.Tensor,
                      block: int) -> torch.Tensor:
    """See :func:`freeze_reference`."""
    return freeze_reference(hidden_in, hidden_out, depth, block)


@early_exit_freeze.register_fake
def _(hidden_in: torch.Tensor, hidden_out: torch.Tensor, depth: torch.Tensor, block: int) -> torch.Tensor:
    return torch.empty_like(hidden_out)


# --- ONNX ------------------------------------------------------------------------------------------

Tensor = TensorType  # the translations' annotations: any tensor type; at export they receive ir.Values


def _ints(*values: int) -> ir.Value:
    return op.Constant(value_ints=list(values))


def early_exit_decide_onnx(logits: Tensor, depth: Tensor, threshold: float, exit_depth: int, criterion: str,
                           shared: bool) -> Tensor:
    """``early_exit_decide`` step by step as its reference."""
    probabilities = op.Softmax(op.Cast(logits, to=ir.DataType.FLOAT), axis=-1)
    if criterion == "max_prob":
        confidence = op.ReduceMax(probabilities, _ints(-1), keepdims=0)
    else:
        top, _ = op.TopK(probabilities, _ints(2), axis=-1)
        first = op.Squeeze(op.Slice(top, _ints(0), _ints(1), _ints(-1)), _ints(-1))
        second = op.Squeeze(op.Slice(top, _ints(1), _ints(2), _ints(-1)), _ints(-1))
        confidence = op.Sub(first, second)
    exit_value = op.CastLike(op.Constant(value_int=exit_depth), depth)
    exited_before = op.Less(depth, exit_value)
    exits = op.Or(op.Greater(confidence, op.Constant(value_float=threshold)), exited_before)
    if shared:
        # all over the batch: the minimum of 0/1 flags; then a running maximum along the sequence,
        # as "the running count of exits is above zero"
        flags = op.Cast(exits, to=ir.DataType.INT64)
        flags = op.Expand(op.ReduceMin(flags, _ints(0), keepdims=1), op.Shape(flags))
        if len(logits.shape) >= 3:
            flags = op.CumSum(flags, op.Constant(value_int=1))
        exits = op.Greater(flags, op.Constant(value_int=0))
    return op.Where(op.And(exits, op.Not(exited_before)), op.Expand(exit_value, op.Shape(depth)), depth)


def early_exit_freeze_onnx(hidden_in: Tensor, hidden_out: Tensor, depth: Tensor, block: int) -> Tensor:
    """``early_exit_freeze`` as ``Where`` over the depths broadcast to the hidden state."""
    frozen = op.LessOrEqual(depth, op.CastLike(op.Constant(value_int=block), depth))
    extra = len(hidden_out.shape) - len(depth.shape)
    if extra:
        frozen = op.Unsqueeze(frozen, _ints(*range(-extra, 0)))
    return op.Where(frozen, hidden_in, hidden_out)


def _register_onnx() -> None:
    # the translation table lives with the other custom ops; adding to it needs no change there
    from bevel.runtime.ops import ONNX_TRANSLATIONS

    ONNX_TRANSLATIONS[torch.ops.bevel.early_exit_decide.default] = early_exit_decide_onnx
    ONNX_TRANSLATIONS[torch.ops.bevel.early_exit_freeze.default] = early_exit_freeze_onnx


_register_onnx()
