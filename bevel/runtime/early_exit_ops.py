"""The two ops of confidence-based early exit, ``bevel::early_exit_decide`` and
``bevel::early_exit_freeze``, with their references and fakes.

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
torch that runs on any device, so they have no Triton kernel. Their ONNX translations live in
``early_exit_onnx``.
"""

from __future__ import annotations

import torch

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
