"""The fidelity check: outputs of a rewritten graph against the original model's on calibration batches.

Figures, each over every calibration batch and every floating-point output tensor:
- ``cosine``: the smallest per-sample cosine similarity (samples are rows of the first dimension);
- ``max_abs_error``: the largest absolute difference;
- ``top1_agreement``: for logits (outputs named ``logits``, or a bare 2-D output with more than one
  column), the fraction of rows whose argmax is unchanged; None when no output is a logit.

Where the model has a padding mask, the per-token outputs [B, N, C, ...] of a batch are compared
at its real positions only: what an encoder computes at padded positions is not meant to be used
(a pooling or a head masks it out), and a rewrite may change it at no cost (quantization) or not
keep it at all (token merging, packing). The mask is the input the attention of the model's
transformer blocks reads it from, found when compiling.

An output may change shape only where a pass declared it would (``reshaped``: token merging without
unmerging leaves per-token outputs with fewer tokens); such an output is not compared, and
``not_compared`` names it, as it names the outputs a pass declared ``unused`` (the cache of a
decoder layer that layer skipping removed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten_with_path

from bevel.ir.printer import output_path


@dataclass
class Fidelity:
    """How close the rewritten outputs are to the original ones (see the module docstring)."""

    cosine: float
    max_abs_error: float
    top1_agreement: float | None = None
    per_output: dict[str, float] = field(default_factory=dict)  # smallest cosine of each output, by path
    not_compared: list[str] = field(default_factory=list)  # outputs whose shape a pass changed on purpose

    @property
    def drop(self) -> float:
        """1 - cosine: what ``max_fidelity_drop`` is compared with."""
        return 1.0 - self.cosine

    def to_json(self) -> dict[str, Any]:
        """A JSON-serializable dict of the figures."""
        return asdict(self)


@dataclass
class _Leaf:
    path: str
    value: torch.Tensor
    index: int  # the position among all the output's leaves (the graph's flat outputs)


def flatten_outputs(outputs: Any) -> list[_Leaf]:
    """The floating-point tensors of a model's output structure, with their pytree paths."""
    leaves, _ = tree_flatten_with_path(outputs)
    return [_Leaf(output_path(path), value.detach().float().cpu(), i) for i, (path, value) in enumerate(leaves)
            if isinstance(value, torch.Tensor) and value.is_floating_point()]


def copied(batch: tuple[Any, ...]) -> tuple[Any, ...]:
    """``batch`` with its tensors cloned: a model that changes its inputs in place (``x.mul_(2)``)
    changes the copy, and every run starts from the same values."""
    return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in batch)


def run_batches(fn: Callable[..., Any], batches: list[tuple[Any, ...]]) -> list[list[_Leaf]]:
    """Call ``fn`` on a copy of every batch without gradients and keep the flattened float outputs."""
    with torch.no_grad():
        return [flatten_outputs(fn(*copied(batch))) for batch in batches]


def _is_logits(leaf: _Leaf, single_output: bool) -> bool:
    if "logits" in leaf.path:
        return leaf.value.dim() >= 2 and leaf.value.shape[-1] > 1
    bare = single_output and leaf.path == ""  # the model returns one tensor, not a named structure
    return bare and leaf.value.dim() == 2 and leaf.value.shape[-1] > 1


def _real_positions_only(value: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
    """``value`` with its padded positions zeroed when it is a per-token output [B, N, ...] of
    ``padding``'s [B, N]; as it is otherwise (a 2-D output is a per-sample one: a pooled [B, C]
    whose C happens to equal N is not masked)."""
    if padding is None or value.dim() < 3 or tuple(value.shape[:2]) != tuple(padding.shape):
        return value
    real = padding.to(value.device).bool().reshape(*padding.shape, *([1] * (value.dim() - 2)))
    return value.masked_fill(~real, 0.0)


def compare(reference: list[list[_Leaf]], candidate: list[list[_Leaf]],
            reshaped: frozenset[int] = frozenset(), unused: frozenset[int] = frozenset(),
            padding: list[torch.Tensor | None] | None = None) -> Fidelity:
    """Fidelity of ``candidate`` outputs against ``reference`` outputs, batch by batch; the flat
    outputs at the positions ``reshaped`` may have changed shape (then they are not compared), those
    at the positions ``unused`` are never compared (a pass made them meaningless on purpose: the
    cache of a removed decoder layer). ``padding`` holds each batch's padding mask [B, N] (or None):
    per-token outputs are compared at its real positions only."""
    cosine, max_err, agree, rows = 1.0, 0.0, 0, 0
    per_output: dict[str, float] = {}
    not_compared: list[str] = []
    for batch, (ref_batch, new_batch) in enumerate(zip(reference, candidate, strict=True)):
        mask = padding[batch] if padding is not None else None
        if len(ref_batch) != len(new_batch):
            raise ValueError(f"the rewritten graph returns {len(new_batch)} float outputs, "
                             f"the original {len(ref_batch)}")
        for ref, new in zip(ref_batch, new_batch):
            if ref.index in unused or (ref.value.shape != new.value.shape and ref.index in reshaped):
                if ref.path not in not_compared:
                    not_compared.append(ref.path or "output")
                continue
            if ref.value.shape != new.value.shape:
                raise ValueError(f"output {ref.path or '[0]'} changed shape from {tuple(ref.value.shape)} "
                                 f"to {tuple(new.value.shape)}")
            ref_value, new_value = _real_positions_only(ref.value, mask), _real_positions_only(new.value, mask)
            if ref_value.numel() == 0:  # an empty batch: nothing to compare (and no rows to reshape into)
                continue
            a = ref_value.reshape(ref_value.shape[0], -1) if ref_value.dim() > 1 else ref_value.reshape(1, -1)
            b = new_value.reshape(a.shape)
            finite = _finite_parts(a, b)
            if finite is None:
                return Fidelity(cosine=-1.0, max_abs_error=float("inf"), top1_agreement=None)
            a, b = finite
            output_cosine = _min_row_cosine(a, b)
            cosine = min(cosine, output_cosine)
            path = ref.path or "output"  # a bare tensor output has an empty path
            per_output[path] = min(per_output.get(path, 1.0), output_cosine)
            if a.numel():
                max_err = max(max_err, float((a - b).abs().max()))
            if _is_logits(ref, len(ref_batch) == 1):
                same = ref.value.argmax(-1) == new.value.argmax(-1)
                agree += int(same.sum())
                rows += same.numel()
    return Fidelity(cosine=cosine, max_abs_error=max_err, top1_agreement=agree / rows if rows else None,
                    per_output=per_output, not_compared=not_compared)


def _finite_parts(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``a`` and ``b`` with their non-finite entries zeroed, if those entries agree exactly (same
    positions, same infinities, NaN where NaN); None if they differ, which counts as a total loss."""
    a_finite, b_finite = torch.isfinite(a), torch.isfinite(b)
    if bool(a_finite.all()) and bool(b_finite.all()):
        return a, b
    if not torch.equal(a_finite, b_finite) or not torch.equal(a.isnan(), b.isnan()):
        return None
    infinite = ~a_finite & ~a.isnan()
    if not torch.equal(a[infinite], b[infinite]):
        return None
    return a.masked_fill(~a_finite, 0.0), b.masked_fill(~b_finite, 0.0)


def _min_row_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 1.0
    a, b = a.double(), b.double()
    norms = a.norm(dim=1) * b.norm(dim=1)
    dots = (a * b).sum(dim=1)
    both_zero = (a.norm(dim=1) == 0) & (b.norm(dim=1) == 0)
    cos = torch.where(norms > 0, dots / norms.clamp_min(1e-300), torch.zeros_like(dots))
    cos = torch.where(both_zero, torch.ones_like(cos), cos)  # two zero rows agree exactly
    return float(cos.min().clamp(-1.0, 1.0))


@dataclass
class HeldOut:
    """Validation batches no pass reads, the original model's outputs on them and their padding masks
    (None where the model has none): what a graph keeps of the model on inputs it was not fitted to
    (``bevel.compile``'s ``validation``)."""

    batches: list[tuple[Any, ...]]
    reference: list[list[_Leaf]]
    padding: list[torch.Tensor] | None

    def quality(self, outputs: list[list[_Leaf]], reshaped: frozenset[int] = frozenset(),
                unused: frozenset[int] = frozenset()) -> dict[str, float]:
        """``held-out cosine`` (the smallest per-sample cosine) of ``outputs`` on the batches, and
        ``held-out top-1`` where outputs are logits."""
        fidelity = compare(self.reference, outputs, reshaped, unused, self.padding)
        figures = {"held-out cosine": fidelity.cosine}
        if fidelity.top1_agreement is not None:
            figures["held-out top-1"] = fidelity.top1_agreement
        return figures

    def measure(self, fn: Callable[..., Any], reshaped: frozenset[int], unused: frozenset[int]) -> dict[str, float]:
        """:meth:`quality` of ``fn`` (a graph) run on the batches."""
        return self.quality(run_batches(fn, self.batches), reshaped, unused)
