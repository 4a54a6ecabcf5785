"""``prune.nm``: N:M semi-structured sparsity, and per layer the kernel that runs it.

In every group of M consecutive weights along a Linear's input dimension, the N with the highest
score stay and the rest become zeros (default 2:4). The score is ``|W|``, or with
``importance="activation"`` Wanda's ``|W_ij| * ||X_j||_2`` from the calibration batches.

A sparse kernel is not a free win: PyTorch's semi-structured sparse tensors (cuSPARSELt) beat a
dense bf16/fp16 GEMM only for large M, N and K, and run several times slower on small ones. So on
CUDA each 2:4 layer is timed at compile time on the target GPU, with its real weight and the row
count M of the example inputs, dense against sparse, and becomes ``bevel::semi_structured_linear``
only where sparse was measured faster by SPARSE_MIN_SPEEDUP. Everywhere else, and always on the
CPU (which has no sparse kernel), the weights stay dense with zeros in a plain ``aten.linear``. The
report gives each layer's form and, on CUDA, the measured dense/sparse time ratio.

The op (``bevel.runtime.ops.semi_structured_linear``) keeps the weight dense, zeros included, in the
graph and compresses it to cuSPARSELt's layout on CUDA. The decision is made for the example
inputs' M: a compiled module later called with far fewer rows keeps it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bevel.errors import ParamError
from bevel.ir.graph import Graph
from bevel.ir.meta import concrete
from bevel.passes.base import Pass, PassContext, PassParams, PassResult, param
from bevel.passes.prune.magnitude import input_channel_norms, require_calibration, set_linear_weight
from bevel.passes.quantize.sites import LinearSite, find_sites
from bevel.passes.registry import register_pass
from bevel.passes.rewritten_layers import rewritten_layers_note

# A layer takes the sparse kernel only when it was measured at least this much faster: timing noise
# of a median of CUDA-event samples is a few percent, and a layer must never end up slower than dense.
SPARSE_MIN_SPEEDUP = 1.05
WARMUP, REPEATS = 5, 20
# dtypes cuSPARSELt multiplies in floating point (float32 has no 2:4 kernel: its sparse format is 1:2)
SPARSE_DTYPES = (torch.float16, torch.bfloat16)


@register_pass("prune.nm")
class NMSparsity(Pass):
    """Keep N of every M consecutive weights along each Linear's input dimension (2:4 by default); on
    CUDA, 2:4 layers take PyTorch's sparse kernel where it was measured faster than dense."""

    @dataclass
    class Params(PassParams):
        n: int = param(2, "weights kept in each group", ge=1)
        m: int = param(4, "consecutive input weights per group", ge=1)
        importance: str = param("magnitude", "'magnitude' scores |w|; 'activation' (Wanda) scores |w| times "
                                             "its input channel's calibration norm (needs calibration)",
                                choices=("magnitude", "activation"))
        skip: tuple[str, ...] = param((), "weight-name patterns (fnmatch, e.g. 'pooler.*') left dense")

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.n > self.m:
                raise ParamError(f"prune.nm(n={self.n}, m={self.m}): n must not exceed m "
                                 f"(n weights are kept out of every m)", key="n")

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.params.importance == "activation"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        n, m = self.params.n, self.params.m
        if n == m:
            return PassResult(changed=False, notes=[f"n = m = {m} keeps every weight: nothing pruned"])
        if self.params.importance == "activation":
            require_calibration(self.name, ctx)
        sites, notes = find_sites(graph, self.params.skip, embeddings=False, left="left dense")
        skipped = {s.weight_name: f"input width {s.weight.shape[1]} is not a multiple of m={m}"
                   for s in sites if s.weight.shape[1] % m}
        sites = [s for s in sites if s.weight_name not in skipped]
        notes += [f"{name} left dense: its {reason}" for name, reason in skipped.items()]
        if not sites:
            notes += rewritten_layers_note(graph, self.name)
            return PassResult(changed=False, stats={"skipped": skipped}, notes=notes + ["no Linear layer to prune"])
        norms = input_channel_norms(graph, sites, ctx.calibration) if self.params.importance == "activation" else {}
        device = torch.device(ctx.device)
        layers = {}
        for site in sites:
            scores = site.weight.abs().float()
            if site.weight_name in norms:
                scores = scores * norms[site.weight_name]
            pruned = torch.where(nm_mask(scores, n, m), site.weight, torch.zeros((), dtype=site.weight.dtype))
            form = choose_form(pruned, rows_of(graph, site), device)
            set_linear_weight(graph, site, pruned)
            if form.kernel == "sparse":
                _use_sparse_kernel(graph, site)
            layers[site.weight_name] = form.as_dict()
        if device.type == "cpu":
            notes.append("weights stay dense with zeros: the CPU has no semi-structured sparse kernel")
        graph.refresh()
        sparse = sum(1 for f in layers.values() if f["kernel"] == "sparse")
        stats = {"pattern": f"{n}:{m}", "layers": layers, "sparse_kernel_layers": sparse, "skipped": skipped}
        return PassResult(changed=True, stats=stats, notes=notes)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """A boolean mask of ``scores`` [N, K] (K a multiple of m) keeping the n highest of every m
    consecutive entries of each row."""
    rows, width = scores.shape
    groups = scores.reshape(rows, width // m, m)
    kept = groups.topk(n, dim=-1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, kept, True).reshape(rows, width)


def rows_of(graph: Graph, site: LinearSite) -> int:
    """M: how many input rows the layer multiplies at the example inputs (all dimensions but the last)."""
    shape = graph.shape(site.x)
    count = 1
    for dim in shape[:-1]:
        count *= concrete(dim)
    return count


@dataclass
class LayerForm:
    """How one pruned layer runs: ``kernel`` "dense" or "sparse", the measured dense/sparse time
    ratio (None where nothing was timed) and why."""

    kernel: str
    speedup: float | None
    reason: str

    def as_dict(self) -> dict[str, object]:
        return {"kernel": self.kernel, "speedup": None if self.speedup is None else round(self.speedup, 3),
                "reason": self.reason}


def choose_form(weight: torch.Tensor, rows: int, device: torch.device) -> LayerForm:
    """Dense or sparse kernel for a pruned weight [N, K] multiplying ``rows`` rows on ``device``."""
    if device.type != "cuda":
        return LayerForm("dense", None, f"no semi-structured sparse kernel on {device.type}: dense with zeros")
    if not is_2_4(weight):
        return LayerForm("dense", None, "the pattern is not 2:4, the only one cuSPARSELt runs")
    if weight.dtype not in SPARSE_DTYPES:
        return LayerForm("dense", None, f"cuSPARSELt has no 2:4 kernel for {weight.dtype}")
    try:
        speedup = measure_sparse_speedup(weight, rows, device)
    except (RuntimeError, ValueError) as error:  # shapes or a GPU cuSPARSELt refuses
        return LayerForm("dense", None, f"the sparse kernel failed on this layer: {str(error).splitlines()[0]}")
    if speedup >= SPARSE_MIN_SPEEDUP:
        return LayerForm("sparse", speedup, f"sparse measured {speedup:.2f}x dense at M={rows}")
    return LayerForm("dense", speedup, f"sparse measured {speedup:.2f}x dense at M={rows}: not faster")


def is_2_4(weight: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive weights along each row has at most 2 non-zeros."""
    if weight.shape[-1] % 4:
        return False
    return bool(((weight != 0).reshape(*weight.shape[:-1], -1, 4).sum(-1) <= 2).all())


def measure_sparse_speedup(weight: torch.Tensor, rows: int, device: torch.device) -> float:
    """Median time of a dense ``F.linear`` over that of the 2:4 sparse one, on ``device`` with random
    inputs of ``rows`` rows; samples alternate between the two so drift affects both alike."""
    from torch.sparse import to_sparse_semi_structured

    dense = weight.detach().to(device)
    sparse = to_sparse_semi_structured(dense)
    x = torch.randn(rows, dense.shape[1], dtype=dense.dtype, device=device)
    calls = {"dense": lambda: F.linear(x, dense), "sparse": lambda: F.linear(x, sparse)}
    samples: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for i in range(WARMUP + REPEATS):
            for name, call in calls.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                call()
                end.record()
                torch.cuda.synchronize(device)
                if i >= WARMUP:
                    samples[name].append(start.elapsed_time(end))
    return statistics.median(samples["dense"]) / statistics.median(samples["sparse"])


def _use_sparse_kernel(graph: Graph, site: LinearSite) -> None:
    """Replace the layer's node by ``bevel::semi_structured_linear`` on its (already pruned) weight."""
    weight = site.node.args[2] if site.node.target == torch.ops.aten.addmm.default else site.node.args[1]
    if site.node.target == torch.ops.aten.addmm.default:
        # addmm reads the weight [K, N]: store it [N, K] under a new name, as the op reads it
        weight = graph.add_param(f"{site.weight_name}_nk", graph.param(site.weight_name).t().contiguous(),
                                 before=site.node, as_parameter=True)
    with graph.fx_graph.inserting_before(site.node):
        new = graph.fx_graph.call_function(torch.ops.bevel.semi_structured_linear.default,
                                           (site.x, weight, site.bias))
    new.meta.update({k: v for k, v in site.node.meta.items() if k in ("nn_module_stack", "stack_trace")})
    graph.replace_node(site.node, new)
