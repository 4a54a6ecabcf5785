"""``lowrank``: a Linear becomes two thinner ones from a truncated SVD of its weight.

``W [N, K] ~= (U_r sqrt(S_r)) (sqrt(S_r) V_r^T)``: the input goes through a [r, K] Linear, then a
[N, r] one that adds the bias (LoRD, Kaushal et al., "Low Rank Decomposition Of Monolingual Code LLMs
For One-Shot Compression"). A layer is factorized only where the two Linears cost fewer FLOPs (and
parameters) than the one, ``r (N + K) < N K``; the others stay as they are and the report says why.

Without calibration batches the SVD is the weight's own, and ``energy`` is the fraction of the sum
of its squared singular values kept. With calibration batches the truncation is fitted to what the
layer computes, as SVD-LLM (Wang et al., "SVD-LLM: Truncation-aware Singular Value Decomposition for
Large Language Model Compression") and ASVD do: with ``H = X^T X`` summed over the layer's
calibration input rows and its Cholesky factor ``L`` (``H + damping = L L^T``), ``||W X^T||^2 =
||W L||^2``, so truncating the SVD ``W L = U S V^T`` to rank r is the rank-r weight whose outputs
on those rows are nearest the original's. The factors are ``U_r sqrt(S_r)`` and
``sqrt(S_r) V_r^T L^-1``; ``energy`` is then the fraction of the layer's output energy ``||W X^T||^2``
on the calibration rows kept (the damping adds a small ``d ||W||^2`` to it).

Each layer is fitted to the original model's inputs, all measured in one calibration run. Fitting
layers stage by stage to the inputs left by those already factorized, as GPTQ does, was measured
on all-MiniLM-L6-v2 and changed the embeddings' fidelity less than the choice of calibration
sentences does, for one run per stage. Only where the layers' ``X^T X`` sums would not fit
HESSIAN_BUDGET together are they measured in several runs, each after the earlier groups were
factorized.

The rank r of each layer is the smallest that keeps ``energy``, or the largest whose two factors
hold ``param_ratio`` of the layer's weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from bevel.errors import ParamError
from bevel.ir.graph import Graph
from bevel.passes.base import Pass, PassContext, PassParams, PassResult, param
from bevel.passes.prune.nm import rows_of
from bevel.passes.quantize.calibration import Resume, collect_input_stats, few_rows_note
from bevel.passes.quantize.sites import LinearSite, find_sites
from bevel.passes.registry import register_pass
from bevel.passes.rewritten_layers import rewritten_layers_note

aten = torch.ops.aten

# float32 elements of the X^T X sums held at once (512 MiB): the calibration run is split into
# several when the layers' input widths would need more
HESSIAN_BUDGET = 2**27
# diagonal added to each layer's X^T X before its Cholesky factor, as a fraction of the mean
# diagonal (GPTQ's 1%): with fewer calibration rows than input channels, or channels never active,
# X^T X is singular and L^-1 would blow up directions the calibration never saw
DAMPING = 0.01


@register_pass("lowrank")
class LowRankFactorize(Pass):
    """Replace each Linear by two thinner ones from a truncated SVD, where that lowers its FLOPs; with
    calibration batches the SVD is whitened by each layer's inputs, so it keeps what its outputs need."""

    @dataclass
    class Params(PassParams):
        energy: float | None = param(None, "fraction kept of each layer's energy: of its output energy "
                                           "||W X||^2 on the calibration inputs when calibration is given, "
                                           "else of its weight's squared singular values (give this or "
                                           "param_ratio)", gt=0.0, le=1.0)
        param_ratio: float | None = param(None, "fraction of each layer's weights its two factors hold "
                                                "(give this or energy)", gt=0.0, lt=1.0)
        skip: tuple[str, ...] = param((), "weight-name patterns (fnmatch, e.g. 'pooler.*') left as they are")

        def __post_init__(self) -> None:
            super().__post_init__()
            if (self.energy is None) == (self.param_ratio is None):
                raise ParamError("lowrank takes exactly one of energy=... (e.g. 0.9: the fraction of each "
                                 "layer's energy kept) and param_ratio=... (e.g. 0.5: the fraction of each "
                                 f"layer's weights kept); got energy={self.energy}, param_ratio={self.param_ratio}",
                                 key="energy")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        sites, notes = find_sites(graph, self.params.skip, embeddings=False, left="left as it is")
        if not ctx.calibrated:
            notes.append("plain SVD of each weight: no calibration batches were given (with them, each "
                         "layer's truncation is fitted to its outputs on them)")
        layers, left, fitted = {}, {}, {}
        resume = Resume()  # each group's runs start where the last group's factorizations did
        for group in hessian_groups(sites) if ctx.calibrated else [sites]:
            hessians = {}
            if ctx.calibrated:
                stats = collect_input_stats(graph, {s.node: s.x for s in group}, ctx.calibration, with_hessian=True,
                                            resume=resume, changes_from=group[0].node)
                hessians = {s.weight_name: stats[s.node].hessian for s in group}
                fitted.update({s.weight_name: (stats[s.node].rows, s.weight.shape[1]) for s in group})
            for site in group:
                n, k = site.weight.shape
                factors = truncated_factors(site.weight, hessians.get(site.weight_name), self.rank)
                rank = factors.rank
                if rank * (n + k) >= n * k:
                    left[site.weight_name] = (f"rank {rank} of {min(n, k)} would not lower its FLOPs: "
                                              f"{rank} x ({n} + {k}) >= {n} x {k}")
                    continue
                flops = 2 * rows_of(graph, site)  # read before the rewrite erases the node it looks at
                _factorize(graph, site, factors.first, factors.second)
                layers[site.weight_name] = {"rank": rank, "shape": [n, k], "params": [n * k, rank * (n + k)],
                                            "flops": [flops * n * k, flops * rank * (n + k)],
                                            "energy": round(factors.energy, 4)}
        notes += [f"{name} left as it is: {reason}" for name, reason in left.items()]
        notes += few_rows_note({name: fitted[name] for name in layers if name in fitted})
        if not layers:
            return PassResult(changed=False, stats={"left": left},
                              notes=notes + rewritten_layers_note(graph, self.name)
                              + ["no Linear layer was worth factorizing: the graph is unchanged"])
        graph.refresh()
        before = sum(v["params"][0] for v in layers.values())
        after = sum(v["params"][1] for v in layers.values())
        stats = {"factorized": len(layers), "layer_params": [before, after], "layers": layers, "left": left,
                 "whitened": ctx.calibrated}
        return PassResult(changed=True, stats=stats, notes=notes)

    def rank(self, singular_values: torch.Tensor, n: int, k: int, dtype: torch.dtype) -> int:
        """The rank the parameters ask for, never above the numerical rank of the singular values."""
        s = singular_values
        if self.params.param_ratio is not None:
            wanted = max(1, int(self.params.param_ratio * n * k / (n + k)))
        else:
            energy = (s ** 2).cumsum(0)
            wanted = int(torch.searchsorted(energy, self.params.energy * energy[-1])) + 1
        return max(1, min(wanted, numerical_rank(s, n, k, dtype)))


def hessian_groups(sites: list[LinearSite]) -> list[list[LinearSite]]:
    """``sites`` cut, in graph order, into groups whose [K, K] input sums fit HESSIAN_BUDGET together."""
    groups: list[list[LinearSite]] = []
    size = 0
    for site in sites:
        width = site.weight.shape[1] ** 2
        if not groups or size + width > HESSIAN_BUDGET:
            groups.append([])
            size = 0
        groups[-1].append(site)
        size += width
    return groups


@dataclass
class Factors:
    """A rank-``rank`` factorization ``second @ first`` of a weight and the energy fraction it keeps."""

    first: torch.Tensor   # [r, K]
    second: torch.Tensor  # [N, r]
    rank: int
    energy: float


def truncated_factors(weight: torch.Tensor, hessian: torch.Tensor | None,
                      choose_rank: Callable[[torch.Tensor, int, int, torch.dtype], int]) -> Factors:
    """Factors of ``weight`` [N, K] from the SVD of ``W`` (``hessian`` None) or of ``W L`` with ``L`` the
    Cholesky factor of the damped ``hessian`` = X^T X [K, K]; ``choose_rank(s, n, k, dtype)`` picks the rank."""
    n, k = weight.shape
    w = weight.double()
    factor = None if hessian is None else input_factor(hessian)
    u, s, vh = torch.linalg.svd(w if factor is None else w @ factor, full_matrices=False)
    rank = choose_rank(s, n, k, weight.dtype)
    root = s[:rank].sqrt()
    right = vh[:rank]
    if factor is not None:  # V_r^T L^-1: solve X L = V_r^T
        right = torch.linalg.solve_triangular(factor, right, upper=False, left=False)
    # contiguous: the solve returns a transposed layout, which a saved artifact would not keep, and a
    # GEMM on another layout sums in another order (the loaded model would differ by float rounding)
    first = (root[:, None] * right).to(weight.dtype).contiguous()
    second = (u[:, :rank] * root).to(weight.dtype).contiguous()
    return Factors(first, second, rank, kept_energy(s, rank))


def input_factor(hessian: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factor L of ``hessian + DAMPING * mean(diag) * I`` in float64 (L L^T = H)."""
    h = hessian.double()
    identity = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    damping = DAMPING * float(h.diagonal().mean())
    if damping <= 0:  # inputs all zero on the calibration rows: nothing to weigh the outputs by
        return identity
    return torch.linalg.cholesky(h + damping * identity)


def kept_energy(singular_values: torch.Tensor, rank: int) -> float:
    """The fraction of the squared singular values the first ``rank`` hold (1 for an all-zero weight)."""
    total = float((singular_values ** 2).sum())
    return float((singular_values[:rank] ** 2).sum()) / total if total else 1.0


def numerical_rank(singular_values: torch.Tensor, n: int, k: int, dtype: torch.dtype) -> int:
    """How many singular values of a [N, K] weight stored in ``dtype`` are above its rounding noise:
    the cutoff ``max(S) * max(N, K) * eps`` of numpy's ``matrix_rank``. Without it ``energy=1.0`` would
    keep every direction of a low-rank weight, noise included."""
    cutoff = singular_values.max() * max(n, k) * torch.finfo(dtype).eps
    return int((singular_values > cutoff).sum())


def _factorize(graph: Graph, site: LinearSite, first: torch.Tensor, second: torch.Tensor) -> None:
    """Replace the layer's node by ``linear(linear(x, first), second, bias)``; the old weight goes
    with the next refresh, when nothing reads it any more."""
    down = graph.add_param(f"{site.weight_name}_lowrank_in", first, before=site.node, as_parameter=True)
    up = graph.add_param(f"{site.weight_name}_lowrank_out", second, before=site.node, as_parameter=True)
    keep = {k: v for k, v in site.node.meta.items() if k in ("nn_module_stack", "stack_trace")}
    with graph.fx_graph.inserting_before(site.node):
        inner = graph.fx_graph.call_function(aten.linear.default, (site.x, down))
        outer = graph.fx_graph.call_function(aten.linear.default, (inner, up, site.bias))
    inner.meta.update(keep)
    outer.meta.update(keep)
    if "val" in site.node.meta:  # the same output: a later layer reading it still knows its shape
        outer.meta["val"] = site.node.meta["val"]
    graph.replace_node(site.node, outer)
