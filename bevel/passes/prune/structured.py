"""``prune.structured``: remove whole channels, attention heads and FFN neurons, physically.

The groups of channels that must go together come from :mod:`bevel.ir.dependency`. In each group
the units (a channel, a head, a kv head with its query heads) are ranked by an importance score and
the lowest ``ratio`` of them are cut out of every weight, bias, BatchNorm statistic and reshape size
of the group, so the graph gets smaller and cheaper with no masks left. Where calibration batches
are given, each layer that read removed channels is compensated: their mean contribution goes into
its bias (FLAP, An et al. 2024), and a Linear's kept columns are refitted to its old output by least
squares on the calibration inputs (see :func:`_compensate`), and every BatchNorm after a layer that
lost inputs moves its running mean by the shift the pruning caused on them (see
:func:`recalibrate_batch_norms`). A conv's fold and a BatchNorm's shift are kept only as far as the
calibration examples agree on them (:func:`shrink`): a deep CNN's small feature maps give a channel
a handful of samples from a few images, and their noise compounds over the layers.
With that refit, activation importance is the output error the Linear layers reading a unit keep
after it: units are removed one by one, each time the one whose removal the refit of the rest makes
up for best (structured Optimal Brain Surgeon, see :func:`_surgeon_scores`).

In a causal LM compiled with its KV cache (the decoder step graph), a KV head removed from the key and
value projections leaves the cache inputs too: the graph's example inputs, the calibration batches
and torch.export's input guards take the smaller cache (see :func:`_cut_inputs`), and the runtime
allocates each layer's cache with the heads it kept (``DecoderSpec.kv_heads``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from bevel.errors import ParamError
from bevel.ir.analysis import CONV_OPS, LINEAR_OPS, flat_outputs, param_count
from bevel.ir.decoder import cache_input_names
from bevel.ir.dependency import BATCH_NORMS, ChannelGroup, DependencyAnalysis, Layout
from bevel.ir.graph import Graph
from bevel.ir.input_guards import resize_guarded_inputs
from bevel.passes.base import Pass, PassContext, PassParams, PassResult, param
from bevel.passes.linear_from_products import products_of_weights_note
from bevel.passes.prune.structured_stats import (ChannelStats, batch_norm_inputs, collect_channel_stats,
                                                 recalibrate_batch_norms, shrink)
from bevel.passes.quantize.calibration import few_rows_note
from bevel.passes.registry import register_pass
from bevel.passes.rewritten_layers import rewritten_layers_note
from bevel.passes.skip_patterns import skipped, unmatched_skip_notes

TARGETS = ("mlp", "heads", "conv", "all")
ATTENTION = torch.ops.aten.scaled_dot_product_attention.default


@register_pass("prune.structured")
class StructuredPrune(Pass):
    """Remove the least important channels, heads and FFN neurons of each group of coupled channels."""

    @dataclass
    class Params(PassParams):
        ratio: float = param(0.25, "fraction of each group's units (channels, heads) removed", ge=0.0, lt=1.0)
        target: str = param("mlp", "which groups: FFN neurons, attention heads, conv channels, or all",
                            choices=TARGETS)
        importance: str = param("l1", "how units are ranked: weight magnitude (l1, l2), the calibration "
                                "output error of the layers reading them after their refit (activation; |W| "
                                "times the activation norm, as Wanda, without compensation), or taylor",
                                choices=("l1", "l2", "activation", "taylor"))
        global_ranking: bool = param(False, "rank units across all groups at once instead of within each group")
        round_to: int = param(1, "keep every pruned layer's width a multiple of this (where grouped convs "
                              "read or write the channels: the width of each of their groups)", ge=1)
        skip: tuple[str, ...] = param((), "weight-name patterns (fnmatch) whose groups are left alone")
        compensate: bool = param(True, "refit the layers that read removed channels to their old output "
                                 "(least squares for Linear, mean fold for Conv) and move the running means of "
                                 "the BatchNorms after them by the shift the pruning caused; needs calibration "
                                 "batches")

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.importance == "taylor":
                raise ParamError("prune.structured(importance='taylor'): Taylor importance needs the gradient of a "
                                 "training loss, and a compile sees inputs without labels or a loss, so there is "
                                 "no gradient to take; use importance='activation' (calibration-weighted) or "
                                 "'l1'", key="importance")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        p = self.params
        # a decoder's KV cache is allocated from the graph's shapes: a pruned KV head leaves it too (another
        # model's inputs are the caller's, whatever their names)
        caches = cache_input_names(graph) if ctx.max_cache_len is not None else frozenset()
        analysis = DependencyAnalysis(graph, resizable_inputs=caches)
        notes = [f"left alone: group '{g.name}' ({g.kind}): node '{g.blocked[0][0]}' {g.blocked[0][1]}"
                 for g in analysis.groups if g.blocked and _wanted(g, p.target)]
        if p.target == "heads":  # a group stopped before its attention never became "heads": say where
            for g in analysis.groups:
                attention = _attention_fed(g) if g.blocked and g.kind != "heads" else None
                if attention is not None:
                    notes.append(f"left alone: group '{g.name}' feeds attention '{attention}', but node "
                                 f"'{g.blocked[0][0]}' {g.blocked[0][1]}")
        candidates = [g for g in analysis.groups if not g.blocked and _wanted(g, p.target)]
        for group in list(candidates):
            names = {s.param for s in group.slices}
            if any(skipped(n, p.skip) for n in names):
                candidates.remove(group)
                notes.append(f"left alone: group '{group.name}' matches a skip pattern")
        notes += unmatched_skip_notes(p.skip, graph)
        if not candidates:
            what = {"heads": "attention heads", "mlp": "FFN neuron groups", "conv": "conv channel groups",
                    "all": "channel groups"}[p.target]
            if p.target == "heads" and not any(graph.nodes(target=ATTENTION)):
                notes.append("the graph has no scaled_dot_product_attention: attention written out as matrix "
                             "products and a softmax has no heads the analysis recognizes (`fuse_attention` "
                             "earlier in the pipeline makes it one op where it can)")
            written_as_addmm = [n.name for n in graph.nodes(target=torch.ops.aten.addmm.default)
                                if graph.is_parameter(n.args[2])]
            if written_as_addmm:
                layers = "1 layer is" if len(written_as_addmm) == 1 else f"{len(written_as_addmm)} layers are"
                notes.append(f"{layers} written as addmm with a weight stored [in, out] "
                             f"(HF Conv1D, as GPT-2's), which the dependency analysis does not follow (first: "
                             f"'{written_as_addmm[0]}'); `cleanup` earlier in the pipeline writes them as Linear "
                             f"layers")
            notes += products_of_weights_note(graph, "the dependency analysis does not follow")
            notes += rewritten_layers_note(graph, self.name)
            return PassResult(changed=False, stats={"groups": {}}, notes=notes + [f"no prunable {what} found: "
                                                                                  f"nothing changed"])
        steps = {}
        for group in list(candidates):
            step = _unit_step(group, p.round_to)
            if step > group.units:
                candidates.remove(group)
                widths = sorted({w // group.blocks for w in group.widths().values()})
                notes.append(f"left alone: group '{group.name}': round_to={p.round_to} is larger than its "
                             f"layers' widths {widths}" if group.blocks == 1 else
                             f"left alone: group '{group.name}': round_to={p.round_to} leaves no narrower "
                             f"width for the {group.blocks} groups of its grouped convs, {widths} channels each")
            else:
                steps[group.name] = step
        if p.ratio == 0 or not candidates:
            return PassResult(changed=False, stats={"groups": {}}, notes=notes + ["nothing removed"])

        stats = self._stats(graph, candidates, ctx)
        if p.importance == "activation" and not ctx.calibrated:
            notes.append("activation norms measured on the example inputs: no calibration batches were given")
        centered = p.compensate and ctx.calibrated
        scores = {}
        for g in candidates:
            score = None
            if p.importance == "activation" and centered:  # ranked by the error left after the refit
                # the greedy removal goes as far as the group may lose: its share, or, ranked globally, all
                # but one step
                share = g.units - _kept(g.units, int(p.ratio * g.units), steps[g.name])
                score = _surgeon_scores(graph, g, stats, g.units - steps[g.name] if p.global_ranking else share)
            scores[g.name] = score if score is not None else _importance(graph, g, p.importance, stats, centered)
        removed = _select(candidates, scores, steps, p.ratio, p.global_ranking)
        removed = {name: units for name, units in removed.items() if units}
        if not removed:
            return PassResult(changed=False, stats={"groups": {}}, notes=notes + [
                f"ratio={p.ratio} removes no whole unit of any group (round_to={p.round_to}): "
                + _smallest_ratio_note(candidates, steps)])

        graph.remove_unused_params()  # so that the count before holds only what the graph reads
        before = param_count(graph)
        chosen = {g.name: g for g in candidates if g.name in removed}
        predicted = before - analysis.removed_params({n: len(u) for n, u in removed.items()})
        compensating = p.compensate and ctx.calibrated
        readers = [c.node for name in chosen for c in chosen[name].consumers]
        # the BatchNorm inputs as they were, for the recalibration to compare with: taken before any weight changes
        batch_norms = batch_norm_inputs(graph, readers, ctx.calibration, BATCH_NORMS) if compensating else {}
        new_biases, fitted = _compensate(graph, chosen, removed, stats) if compensating else ({}, {})
        notes += few_rows_note(fitted)
        dropped = _cut(graph, chosen, removed, new_biases, caches)
        folded = sum(graph.param(name).numel() for name in new_biases)
        resized = {name: dims for name, dims in dropped.items() if name in caches}
        if resized:
            _cut_inputs(graph, ctx, resized)
        graph.refresh()
        recalibrated = []
        if compensating:
            batch_norms = {name: (_without(total, dropped.get(name, {}).get(0, ()), 1), count)
                           for name, (total, count) in batch_norms.items()}
            recalibrated = recalibrate_batch_norms(graph, readers, ctx.calibration, BATCH_NORMS, batch_norms)
        report = {}
        for name, group in chosen.items():
            kept = group.units - len(removed[name])
            widths = {w: [size, size * kept // group.units] for w, size in group.widths().items()}
            report[name] = {"kind": group.kind, "units": [group.units, kept], "widths": widths}
        result_stats = {"groups": report, "params": [before, param_count(graph)],
                        "predicted_params": predicted + folded, "bias_params_added": folded,
                        "importance": p.importance, "batch_norms_recalibrated": len(recalibrated)}
        if resized:  # the cache comes back as small as it goes in
            result_stats["reshaped_outputs"] = _outputs_written_into(graph, set(resized))
        return PassResult(changed=True, stats=result_stats, notes=notes)

    @staticmethod
    def _stats(graph: Graph, groups: list[ChannelGroup], ctx: PassContext) -> dict:
        watched = {c.source: c.dim for g in groups for c in g.consumers}
        return collect_channel_stats(graph, watched, ctx.calibration)


def _wanted(group: ChannelGroup, target: str) -> bool:
    return target == "all" or group.kind == target


def _attention_fed(group: ChannelGroup) -> str | None:
    """The name of an attention op that a producer of ``group`` feeds with no other layer in between, if any."""
    seen, stack = set(), [user for producer in group.producers for user in producer.users]
    while stack:
        node = stack.pop()
        if node in seen or node.op != "call_function" or node.target in LINEAR_OPS + CONV_OPS:
            continue
        if node.target == ATTENTION:
            return node.name
        seen.add(node)
        stack.extend(node.users)
    return None


def _unit_step(group: ChannelGroup, round_to: int) -> int:
    """The smallest number of units whose channels are a multiple of ``round_to`` in every producer, in
    each block of a grouped conv: CPU kernels of grouped convs run fast at group widths such as 4 or 8
    and slower at 3 or 7 than at 4 or 8 (torch, a 32-group conv: 6.2 ms at width 3, 5.1 ms at 4)."""
    step = 1
    for width in group.widths().values():
        per_unit = width // (group.units * group.blocks)
        step = math.lcm(step, round_to // math.gcd(round_to, per_unit))
    return step


def _per_unit(values: torch.Tensor, dim: int, offset: int, layout: Layout) -> torch.Tensor:
    """``values`` summed over everything but the group's units along ``dim``: one figure per unit."""
    part = values.detach().float().movedim(dim, 0)[offset:offset + layout.size]
    return part.reshape(layout.outer, layout.units, layout.per, -1).sum(dim=(0, 2, 3))


def _importance(graph: Graph, group: ChannelGroup, importance: str, stats: dict, centered: bool) -> torch.Tensor:
    """One score per unit of ``group``: higher is more important.

    "activation" scores a channel by what removing it takes from the layers that read it: the L2 norm
    of its weight column times the L2 norm of its calibration activations (Wanda's |W| times ||x||, per
    column). With ``centered`` the removed channels' means go to the next bias, so what is lost is
    only their fluctuation around the mean, and the activation norm is taken about the mean (as FLAP).
    (Where the readers are Linear layers that get refitted, :func:`_surgeon_scores` ranks instead.)
    "l1" and "l2" sum the magnitudes of the unit's weights in every layer of the group, a producer's
    output rows taken as folded with the BatchNorm after it (see :func:`_batch_norm_scale`).
    """
    score = torch.zeros(group.units)
    if importance == "activation":
        for consumer in group.consumers:
            weight = _dense(graph.param(consumer.node.args[1].target).detach().float(), consumer.groups)
            column = weight.movedim(1, 0).reshape(weight.shape[1], -1).pow(2).sum(dim=1)
            seen = stats[consumer.source]
            energy = seen.squares - seen.count * seen.mean.pow(2) if centered else seen.squares
            score += _per_unit((column * energy.clamp(min=0)).sqrt(), 0, consumer.offset, consumer.layout)
        return score
    power = 1 if importance == "l1" else 2
    for s in group.slices:
        if s.role == "input":  # a graph input (a KV cache) holds no weights
            continue
        tensor = graph.param(s.param)
        if s.role in ("producer", "consumer") and tensor.dim() >= 2:
            magnitude = tensor.detach().float().abs().pow(power)
            scale = _batch_norm_scale(graph, s.node) if s.role == "producer" else None
            if scale is not None:
                magnitude = magnitude * scale.pow(power).reshape(-1, *[1] * (magnitude.dim() - 1))
            score += _per_unit(magnitude, s.dim, s.offset, s.layout)
    return score


def _dense(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv's weight ``[out, in / groups, ...]`` as the dense one it stands for, ``[out, in, ...]``:
    block ``g`` of the output reads block ``g`` of the input, and nothing else (zeros there)."""
    if groups == 1:
        return weight
    out, within = weight.shape[:2]
    dense = weight.new_zeros(out, within * groups, *weight.shape[2:])
    rows = out // groups
    for g in range(groups):
        dense[g * rows:(g + 1) * rows, g * within:(g + 1) * within] = weight[g * rows:(g + 1) * rows]
    return dense


def _batch_norm_scale(graph: Graph, layer: fx.Node) -> torch.Tensor | None:
    """``|gamma| / sqrt(var + eps)`` of the BatchNorm (in eval mode) that reads ``layer``'s output, if one does.

    A BatchNorm rescales each output channel by this, so the layer's weight magnitude alone says
    little about a channel (its norm is divided out); the weight folded with the BatchNorm does, and
    a small |gamma| marks a channel the network has learned to silence (network slimming, Liu et al.
    2017).
    """
    for user in layer.users:
        if user.op != "call_function" or user.target not in BATCH_NORMS or user.args[0] is not layer:
            continue
        gamma, variance = user.args[1], user.args[4]
        eps = user.args[7] if user.target == torch.ops.aten.batch_norm.default else user.args[6]
        if not graph.is_tensor_attr(variance):
            return None
        scale = (graph.param(variance.target).detach().float() + eps).rsqrt()
        if gamma is not None:
            if not graph.is_tensor_attr(gamma):
                return None
            scale = scale * graph.param(gamma.target).detach().float().abs()
        return scale
    return None


def _select(groups: list[ChannelGroup], scores: dict[str, torch.Tensor], steps: dict[str, int], ratio: float,
            global_ranking: bool) -> dict[str, list[int]]:
    """The units each group drops: the lowest-scoring ones, the count set by ``ratio`` (per group, or
    over all groups with scores normalized by each group's mean), kept counts rounded up to the step."""
    counts = {g.name: int(ratio * g.units) for g in groups}
    if global_ranking:
        entries = []
        for g in groups:
            mean = float(scores[g.name].mean()) or 1.0
            entries += [(float(v) / mean, g.name) for v in scores[g.name]]
        entries.sort()
        budget = int(ratio * sum(g.units for g in groups))
        counts = dict.fromkeys(counts, 0)
        limit = {g.name: g.units - steps[g.name] for g in groups}
        for _, name in entries:
            if budget == 0:
                break
            if counts[name] < limit[name]:
                counts[name] += 1
                budget -= 1
    removed = {}
    for g in groups:
        drop = max(0, g.units - _kept(g.units, counts[g.name], steps[g.name]))
        order = torch.argsort(scores[g.name], stable=True)
        removed[g.name] = sorted(int(u) for u in order[:drop])
    return removed


def _smallest_ratio_note(groups: list[ChannelGroup], steps: dict[str, int]) -> str:
    """Says how large a ratio removes something: the smallest that takes a step of units off a group."""
    def needed(group: ChannelGroup) -> float:
        count = next((c for c in range(1, group.units) if _kept(group.units, c, steps[group.name]) < group.units),
                     None)
        # rounded up, so that int(ratio * units) reaches the count; past 1 where one step is the whole group
        return 2.0 if count is None else math.ceil(count / group.units * 100) / 100

    group = min(groups, key=needed)
    if needed(group) >= 1:
        return (f"round_to leaves every group a single step wide (group '{group.name}': {group.units} units, taken "
                f"{steps[group.name]} at a time)")
    units = {"heads": "heads", "conv": "channels", "mlp": "neurons"}.get(group.kind, "units")
    return (f"group '{group.name}' has {group.units} {units}, taken {steps[group.name]} at a time; ratio="
            f"{needed(group)} or more removes some")


def _kept(units: int, count: int, step: int) -> int:
    """How many of ``units`` stay when ``count`` are to go: rounded up to a multiple of ``step``, at least one step."""
    return max(step, math.ceil((units - count) / step) * step)


def _surgeon_scores(graph: Graph, group: ChannelGroup, stats: dict[object, ChannelStats],
                    limit: int) -> torch.Tensor | None:
    """Activation importance when the layers that read the group are refitted: the output error they keep.

    Structured Optimal Brain Surgeon (ZipLM, Kurtic et al. 2023; Frantar and Alistarh 2022). For a
    Linear ``W`` reading ``[x, 1]`` with calibration moments ``H`` (damped as in the refit), removing
    the columns ``U`` of a unit and refitting the rest by least squares adds
    ``trace(W_U [H^-1]_UU^-1 W_U^T)`` to its squared output error over the calibration rows. The
    cheapest unit (costs summed over the group's consumers) is removed, ``W`` takes the refit and
    ``H^-1`` loses the unit's rows and columns, and again, ``limit`` times: a unit's score is the
    error left once it and those before it are gone, so the lowest scores are the greedy choice, and
    the units left get that error plus their cost then. Ranking by the error after the refit keeps
    a unit that others cannot stand in for, however small its own activations. None when a consumer
    is not a Linear with the moments of its input (a conv): the group is then ranked without the refit.
    """
    layers = []
    for consumer in group.consumers:
        seen = stats.get(consumer.source)
        if consumer.node.target not in LINEAR_OPS or seen is None or seen.gram is None:
            return None
        weight = graph.param(consumer.node.args[1].target).detach().double()
        weight = torch.cat([weight, weight.new_zeros(weight.shape[0], 1)], dim=1)  # the bias column takes its share
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(_moments(seen)))
        index = torch.tensor([consumer.layout.indices([u], consumer.offset) for u in range(group.units)])
        layers.append((weight, inverse, index))

    def costs(alive: torch.Tensor) -> torch.Tensor:
        """The error each unit still in ``alive`` would add, summed over the consumers."""
        total = torch.zeros(int(alive.sum()), dtype=torch.float64)
        for weight, inverse, index in layers:
            columns = index[alive]  # [units, per unit]
            parts = weight.index_select(1, columns.flatten()).view(weight.shape[0], *columns.shape)
            blocks = inverse[columns.unsqueeze(2), columns.unsqueeze(1)]
            if columns.shape[1] == 1:  # one channel per unit (FFN neurons): a division, not batched solves
                total += parts.pow(2).sum(dim=(0, 2)) / blocks.flatten()
            else:
                total += torch.einsum("oub,ubc,ouc->u", parts, torch.linalg.inv(blocks), parts)
        return total

    alive = torch.ones(group.units, dtype=torch.bool)
    scores = torch.zeros(group.units, dtype=torch.float64)
    error = 0.0
    for _ in range(limit):
        cost = costs(alive)
        unit = int(alive.nonzero()[int(cost.argmin())])
        error += float(cost.min())
        scores[unit] = error
        alive[unit] = False
        for weight, inverse, index in layers:
            columns = index[unit]
            # the least-squares refit of the kept columns, and the inverse of their moments without the unit
            solved = torch.linalg.solve(inverse[columns][:, columns], inverse[columns])  # [per unit, size + 1]
            weight.addmm_(weight[:, columns], solved, alpha=-1)
            inverse.addmm_(inverse[:, columns], solved, alpha=-1)
    if alive.any():
        scores[alive] = error + costs(alive)
    return scores  # float64: the running sums must not round into ties


def _compensate(graph: Graph, groups: dict[str, ChannelGroup], removed: dict[str, list[int]],
                stats: dict[object, ChannelStats]) -> tuple[dict[str, str], dict[str, tuple[int, int]]]:
    """Give every layer that read removed channels what they contributed, as far as the kept ones allow.

    A Linear ``W x + b`` refits its kept columns and bias to its old output by least squares on the
    calibration inputs (closed form from the sums of ``x x^T``): ``[W_K, b] += W_R C_RK C_KK^-1`` over
    ``[x_K, 1]``. Where removed channels are uncorrelated with the kept ones this is their mean folded
    into the bias. A conv gets that mean fold: its output on the mean input restricted to the removed
    channels, averaged over positions (the zero padding makes it depend on position), as far as the
    examples agree on it (:func:`_determined`). A layer without a bias gets one; returns those new
    biases with their weight names, and the calibration rows and input channels of each Linear refitted.
    """
    created, fitted = {}, {}
    for name, group in groups.items():
        for consumer in group.consumers:
            node, seen = consumer.node, stats[consumer.source]
            weight = graph.param(node.args[1].target).detach()
            gone = torch.tensor(consumer.layout.indices(removed[name], consumer.offset))
            if node.target in LINEAR_OPS:
                fitted[node.args[1].target] = (seen.count, weight.shape[1])
                weight, delta = _refit_linear(weight, gone, seen)
                graph.set_param(node.args[1].target, weight)
            elif seen.batch_mean is not None:
                mean = seen.batch_mean  # one mean example [C, *spatial]
                mask = torch.zeros(mean.shape[0])
                mask[gone] = 1
                only_removed = mean * mask.reshape(-1, *[1] * (mean.dim() - 1))
                with torch.no_grad():
                    out = node.target(only_removed.unsqueeze(0).to(weight.dtype), weight, None, *node.args[3:])
                delta = _determined(out.mean(dim=(0, *range(2, out.dim()))), _dense(weight, consumer.groups), gone,
                                    seen)
            else:
                continue  # conv inputs of varying sizes: no one mean example
            bias = node.args[2] if len(node.args) > 2 else None
            if bias is None:
                new = graph.add_param(node.args[1].target.rsplit(".", 1)[0] + ".bias", delta, before=node,
                                      as_parameter=True)
                node.args = (node.args[0], node.args[1], new, *node.args[3:])
                created[new.target] = node.args[1].target
            else:
                graph.set_param(bias.target, graph.param(bias.target).detach() + delta)
    return created, fitted


def _determined(delta: torch.Tensor, weight: torch.Tensor, gone: torch.Tensor, seen: ChannelStats) -> torch.Tensor:
    """A conv's mean fold ``delta`` kept as far as the calibration examples agree on it (:func:`shrink`).

    Each example's own contribution is taken as its removed channels' means through the summed kernel
    (the zero padding aside: it only serves to measure the spread). Where the removed channels' mean
    is near zero (a residual stream after its BatchNorm) the fold is the noise of a few samples, and
    folded whole it adds that noise to every output (1 + 1/n times the error of no fold, for n examples).
    """
    totals, counts = seen.per_example()
    kernel = weight.detach().double()[:, gone].flatten(2).sum(dim=2)  # [out, removed]
    each = (totals[:, gone] / counts) @ kernel.T  # [examples, out]
    left_out = delta.double() - (each - each.mean(dim=0)) / max(1, each.shape[0] - 1)
    return shrink(delta.double(), left_out).to(delta.dtype)


# damping of the least-squares refit, relative to the mean diagonal: keeps the solve well posed when
# a few thousand calibration rows leave some directions of the kept channels barely seen
REFIT_DAMPING = 0.01


def _moments(seen: ChannelStats) -> torch.Tensor:
    """The damped sums of ``[x, 1] [x, 1]^T`` over the calibration rows of a Linear's input ``x``."""
    size = seen.gram.shape[0]
    moments = torch.zeros(size + 1, size + 1, dtype=torch.float64)
    moments[:size, :size] = seen.gram.double()
    moments[:size, size] = moments[size, :size] = seen.total.double()
    moments[size, size] = seen.count
    # the constant column is not damped: its normal equation then holds exactly, so the refitted
    # layer's mean output over the calibration data is the old one
    moments[range(size), range(size)] += REFIT_DAMPING * moments.diagonal()[:-1].mean()
    return moments


def _refit_linear(weight: torch.Tensor, gone: torch.Tensor, seen: ChannelStats) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight with its kept columns refitted, and what the bias gains (see :func:`_compensate`)."""
    size = weight.shape[1]
    moments = _moments(seen)
    keep = torch.tensor(sorted(set(range(size + 1)) - set(gone.tolist())))
    transfer = torch.linalg.solve(moments[keep][:, keep], moments[keep][:, gone]).T  # [removed, kept + 1]
    delta = weight[:, gone].double() @ transfer
    refitted = weight.clone()
    refitted[:, keep[:-1]] += delta[:, :-1].to(weight.dtype)
    return refitted, delta[:, -1].to(weight.dtype)


def _without(tensor: torch.Tensor, gone: set[int], dim: int = 0) -> torch.Tensor:
    """``tensor`` without the indices ``gone`` along ``dim``."""
    keep = torch.tensor([i for i in range(tensor.shape[dim]) if i not in gone], dtype=torch.long,
                        device=tensor.device)
    return tensor.index_select(dim, keep)


def _cut_inputs(graph: Graph, ctx: PassContext, cut: dict[str, dict[int, set[int]]]) -> None:
    """Cut the graph inputs a caller allocates from the graph's shapes (a decoder's KV cache) where
    their channels went: the inputs' example values, the graph's example inputs and the calibration
    batches. The context gets new lists, so a pass the manager rolls back leaves it as it was."""
    position = {node.name: i for i, node in enumerate(graph.inputs())}

    def cut_batch(batch: tuple[Any, ...]) -> tuple[Any, ...]:
        batch = list(batch)
        for name, dims in cut.items():
            for dim, gone in dims.items():
                batch[position[name]] = _without(batch[position[name]], gone, dim)
        return tuple(batch)

    sizes = {}
    for node in graph.inputs():
        if node.name in cut:
            value = node.meta["val"]
            shape = [size - len(cut[node.name].get(dim, ())) for dim, size in enumerate(value.shape)]
            node.meta["val"] = value.new_empty(shape)
            sizes[node.name] = {dim: (shape[dim], value.shape[dim]) for dim in cut[node.name]}
    resize_guarded_inputs(graph.module, sizes)
    graph.example_inputs = cut_batch(graph.example_inputs)
    ctx.calibration = [cut_batch(batch) for batch in ctx.calibration]
    ctx.example_inputs = cut_batch(ctx.example_inputs)


def _outputs_written_into(graph: Graph, inputs: set[str]) -> list[int]:
    """Positions among the graph's flat outputs of the tensors written into the graph ``inputs``."""
    return [i for i, value in enumerate(flat_outputs(graph)) if isinstance(value, fx.Node)
            and value.target == torch.ops.aten.index_copy.default and value.args[0].name in inputs]


def _cut(graph: Graph, groups: dict[str, ChannelGroup], removed: dict[str, list[int]],
         new_biases: dict[str, str], inputs: frozenset[str]) -> dict[str, dict[int, set[int]]]:
    """Slice every stored tensor and reshape size of the chosen groups; a bias created by folding loses
    the output rows its layer's weight loses. Returns the indices each tensor lost, by name and dim, the
    graph ``inputs`` they write into among them (cut by :func:`_cut_inputs`)."""
    drop: dict[str, dict[int, set[int]]] = {}
    for name, group in groups.items():
        for s in group.slices:
            drop.setdefault(s.param, {}).setdefault(s.dim, set()).update(s.layout.indices(removed[name], s.offset))
    for bias, weight in new_biases.items():
        if 0 in drop.get(weight, {}):
            drop[bias] = {0: drop[weight][0]}
    for param_name, dims in drop.items():
        if param_name in inputs:
            continue
        tensor = graph.param(param_name).detach()
        for dim, gone in dims.items():
            tensor = _without(tensor, gone, dim)
        graph.set_param(param_name, tensor.contiguous())
    for name, group in groups.items():
        for arg in group.shape_args:
            delta = len(removed[name]) * arg.layout.outer * arg.layout.per
            node, value = arg.node, arg.node.args[arg.arg]
            if arg.position is None:  # the size of each piece of an even split
                node.update_arg(arg.arg, value - delta)
                continue
            sizes = list(value)
            if arg.factor is None:
                sizes[arg.position] -= delta
            else:  # B * heads: a product of its own, as the graph may share one between layers
                product = sizes[arg.position]
                factors = list(product.args)
                factors[arg.factor] -= delta
                with graph.fx_graph.inserting_before(node):
                    sizes[arg.position] = graph.fx_graph.call_function(product.target, tuple(factors))
            node.update_arg(arg.arg, sizes)
    return drop
