"""Channel dependencies: which channel dimensions of a graph must be pruned together.

Every Linear and Conv layer with a parameter weight *produces* channels (its output features). Those
channels are followed forward through the graph, op by op, to where they are *consumed* (the input
features of a later Linear or Conv). Ops on the way may tie the channels of several producers
together (a residual add, q/k/v meeting in attention, the two branches of a gated MLP): tied producers
form one :class:`ChannelGroup`, held as connected components of a networkx graph over the producers.

A group is pruned in *units*. One unit of a producer is a set of its output channels laid out as
``outer x units x per`` along its output dimension: an FFN neuron is one channel (1, n, 1); an
attention head of a q projection is ``head_dim`` consecutive channels (1, heads, head_dim); a head of
a fused qkv projection is three slices of ``head_dim`` channels (3, heads, head_dim). The analysis
starts every producer at one channel per unit and coarsens a group's unit wherever an op needs it:

- a reshape that splits the channel dimension puts the units in the factor just before the last one
  (``[B, S, H*D] -> [B, S, H, D]``: heads, never a slice inside every head);
- an op that ties two groups (an add, attention) needs both sides cut alike, so each is coarsened
  to the common unit. Grouped-query attention follows from this rule: a key/value head feeds
  ``heads / kv_heads`` query heads through the repeat before attention, so the query projection's
  unit becomes those query heads together, and a kv head is removed only together with its query
  heads.

nn.MultiheadAttention takes three more rules: its fused projection is split as ``[3, E]`` and q, k
and v picked out by index, so where a split's leading factor is indexed later the units lie in the
last factor, once per part; it folds the heads into the batch (``[T, B, E] -> [T, B * H, D]`` and
back to ``[B, H, T, D]``), so a dimension may carry the run-time batch outside its units (sized in
the graph as ``B * H``, which the cut gives a product of its own); and it expands one padding mask
to every head, whose sizes shrink with the heads.

Where the channels meet an op this module has no rule for, reach the model's output, or are tied to
something that cannot be cut (an embedding table, channels normalized together by a LayerNorm, a
weight read by two ops), the group is *blocked*: it is left alone, and :attr:`ChannelGroup.blocked`
names the node and why. A transformer's residual stream is blocked this way, by its LayerNorms.

A depthwise convolution (one group per channel, MobileNet's and EfficientNet's blocks) is no producer:
it filters each channel of its input on its own, so its output carries its input's channels, and its
filters, bias and ``groups`` argument are cut with them. Another grouped convolution (``G`` groups of
several channels: ResNeXt, RegNet) reads block ``g`` of its input only in block ``g`` of its output, and
every block must keep the same width, so on both sides a unit is one channel position taken in all
``G`` blocks (its unit's ``outer`` is a multiple of ``G``); its weight's input dimension, indexed
within a block, loses that position once, and ``groups`` stays.

A decoder step graph writes each layer's keys and values into its KV cache inputs (``index_copy``
along the slots): where the caller allocates those inputs from the graph's own shapes
(``resizable_inputs``), a KV head's channels go from the cache too, and the written cache may reach
the graph's outputs, which come back as small as the inputs went in.

Tensors whose channels lie in runs of different lengths meet (an add, a multiply) where each run can
be cut into runs of equal length: GhostNet puts a conv's channels beside their depthwise-filtered
copy ([A, A]) and adds that to a conv's 2A channels, whose unit then is a channel of each half. A
group asked for units coarser than its layers' widths (two ops wanting the whole width as one unit,
laid out differently) is left alone at once rather than coarsened without end.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

from bevel.ir.analysis import CONV_OPS, LINEAR_OPS, VIEW_OPS, read_counts
from bevel.ir.graph import Graph
from bevel.ir.input_guards import GUARDS
from bevel.ir.meta import concrete

aten = torch.ops.aten


@dataclass(frozen=True)
class Layout:
    """How a group's units lie along one tensor dimension: ``outer x units x per`` elements, unit
    ``u`` owning indices ``o * units * per + u * per + r``. A ``batched`` dimension also holds a
    factor of run-time size outside ``outer`` (nn.MultiheadAttention folds its heads into the batch,
    ``[T, B, H * D] -> [T, B * H, D]``): it is followed, never sliced."""

    outer: int
    units: int
    per: int
    batched: bool = False

    @property
    def size(self) -> int:
        return self.outer * self.units * self.per

    def indices(self, units: list[int], offset: int = 0) -> list[int]:
        """The indices along the dimension that ``units`` occupy."""
        return [offset + o * self.units * self.per + u * self.per + r
                for o in range(self.outer) for u in units for r in range(self.per)]


@dataclass(frozen=True)
class Segment:
    """A run of one dimension: the channels of group ``group`` (a producer id) in ``layout``, or, with
    ``group`` None, ``layout.size`` channels no group owns (the input of a concat that is not pruned)."""

    group: int | None
    layout: Layout


@dataclass(frozen=True)
class Track:
    """The channels a tensor carries: along dimension ``dim``, the ``segments`` one after another."""

    dim: int
    segments: tuple[Segment, ...]

    def offsets(self) -> list[int]:
        starts, at = [], 0
        for segment in self.segments:
            starts.append(at)
            at += segment.layout.size
        return starts


@dataclass
class Slice:
    """A stored tensor cut along ``dim`` when the group drops units: ``role`` is "producer" (a layer's
    output rows and bias), "consumer" (a layer's input columns) or "attached" (BatchNorm statistics,
    an added bias); or "input", a graph input named ``param`` that the caller allocates from the
    graph's shapes (a decoder's KV cache)."""

    param: str
    dim: int
    offset: int
    layout: Layout
    role: str
    node: fx.Node


@dataclass
class ShapeArg:
    """A size that counts the group's channels: ``node.args[arg][position]`` (a view/reshape/expand/
    unflatten size list, a split's sizes), or ``node.args[arg]`` itself where ``position`` is None (a
    split's piece size). Where ``factor`` is set, the entry is a node computing a run-time size times
    an int (``B * heads``), ``factor`` the int's place in its args."""

    node: fx.Node
    position: int | None
    offset: int
    layout: Layout
    arg: int = 1
    factor: int | None = None


@dataclass
class Consumer:
    """A Linear or Conv layer reading the group's channels: its input ``source`` carries them along ``dim``
    (``layout`` there); a grouped conv's weight holds ``groups`` blocks of input channels side by side."""

    node: fx.Node
    source: fx.Node
    dim: int
    offset: int
    layout: Layout
    groups: int = 1


@dataclass
class ChannelGroup:
    """Channels that are pruned together. ``units`` is how many units each member has; ``name`` is the
    weight of its first producer; ``kind`` is "heads" (it passes through attention), "conv" or "mlp"."""

    name: str
    kind: str
    units: int
    producers: list[fx.Node] = field(default_factory=list)
    slices: list[Slice] = field(default_factory=list)
    shape_args: list[ShapeArg] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    blocked: list[tuple[str, str]] = field(default_factory=list)  # (node name, why)

    @property
    def blocks(self) -> int:
        """How many blocks of equal width the grouped convs reading or writing the channels split them
        into (1 where none does)."""
        grouped = (_conv_groups(p)[1] for p in self.producers if p.target in CONV_OPS)
        return math.lcm(*(c.groups for c in self.consumers), *(g for g in grouped if isinstance(g, int)))

    def widths(self) -> dict[str, int]:
        """Output channels of each producer, by weight name."""
        return {s.param: s.layout.size for s in self.slices if s.role == "producer" and s.dim == 0
                and s.param.endswith("weight")}


class Unsupported(Exception):
    """An op the analysis has no rule for, or uses in a way it cannot follow."""


# ops whose output holds the channels of their first argument where it had them
_UNARY = {aten.relu.default, aten.relu_.default, aten.gelu.default, aten.gelu_.default, aten.silu.default,
          aten.silu_.default, aten.sigmoid.default, aten.tanh.default, aten.neg.default, aten.abs.default,
          aten.exp.default, aten.erf.default, aten.sqrt.default, aten.rsqrt.default, aten.hardtanh.default,
          aten.hardtanh_.default, aten.hardswish.default, aten.hardswish_.default, aten.hardsigmoid.default,
          aten.hardsigmoid_.default,
          aten.leaky_relu.default, aten.leaky_relu_.default, aten.elu.default, aten.elu_.default,
          aten.selu.default, aten.selu_.default, aten.celu.default, aten.celu_.default, aten.softplus.default,
          aten.mish.default, aten.mish_.default, aten.relu6.default, aten.sigmoid_.default, aten.tanh_.default,
          aten.threshold.default, aten.threshold_.default, aten.log_sigmoid.default, aten.softshrink.default,
          aten.hardshrink.default, aten.rrelu.default,
          aten.dropout.default, aten.dropout_.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
          aten.detach.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default,
          aten.pow.Tensor_Scalar, aten.mul.Scalar, aten.add.Scalar, aten.sub.Scalar, aten.div.Scalar,
          aten.lift_fresh_copy.default, aten.type_as.default}
_ELEMENTWISE = {aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor, aten.sub_.Tensor, aten.mul.Tensor,
                aten.mul_.Tensor, aten.div.Tensor, aten.div_.Tensor, aten.maximum.default,
                aten.minimum.default}
# ops that move dimensions around, and ones that pick a dimension apart by index
_MOVES = (aten.transpose.int, aten.permute.default, aten.t.default, aten.unsqueeze.default, aten.squeeze.dim,
          aten.squeeze.default, aten.expand.default, aten.slice.Tensor)
_INDEXING = (aten.select.int, aten.unbind.int)
_RESHAPES = {*VIEW_OPS, aten.flatten.using_ints, aten.unflatten.int}
# ops on the spatial dims of [B, C, ...] that treat each channel on its own: pools and resizes
_PER_CHANNEL_SPATIAL = {aten.max_pool2d.default, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default,
                  aten.max_pool1d.default, aten.avg_pool1d.default, aten.adaptive_avg_pool1d.default,
                  *(getattr(getattr(aten, op), overload) for overload in ("default", "vec") for op in (
                      "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "_upsample_nearest_exact1d",
                      "_upsample_nearest_exact2d", "_upsample_nearest_exact3d", "upsample_linear1d",
                      "upsample_bilinear2d", "upsample_trilinear3d", "upsample_bicubic2d"))}
_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default}
_IGNORED_READS = {aten._assert_tensor_metadata.default}
BATCH_NORMS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}


def _shape(node: Any) -> list[int] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return [concrete(d) for d in val.shape] if isinstance(val, torch.Tensor) else None


def _symbolic_dims(node: fx.Node) -> set[int]:
    val = node.meta.get("val")
    return {i for i, d in enumerate(val.shape) if isinstance(d, torch.SymInt)} if isinstance(val, torch.Tensor) \
        else set()


class _Pass:
    """One forward sweep over the graph under the current units; collects what must change before
    the next sweep (coarsenings, couplings) and, once nothing must, the members of every group."""

    def __init__(self, analysis: "DependencyAnalysis") -> None:
        self.a = analysis
        self.graph = analysis.graph
        self.root = analysis.roots()
        self.unsplittable = {self.root[member] for member in analysis.unsplittable}
        self.tracks: dict[fx.Node, Any] = {}
        self.coarsen: dict[int, tuple[int, int]] = {}
        self.couple: list[tuple[int, int]] = []
        self.blocked: dict[int, list[tuple[str, str]]] = {}
        self.slices: dict[int, list[Slice]] = {}
        self.shape_args: dict[int, list[ShapeArg]] = {}
        self.consumers: dict[int, list[Consumer]] = {}
        self.attention: set[int] = set()
        self.input_writes: set[fx.Node] = set()  # writes into resizable inputs: outputs that may shrink

    # -- bookkeeping ------------------------------------------------------------------------------

    def block(self, track: Any, node: fx.Node, why: str) -> None:
        for group in _groups_of(track):
            self.blocked.setdefault(self.root[group], []).append((node.name, why))

    def request_coarsen(self, group: int, outer: int, per: int) -> bool:
        """Ask for the group's units to be ``outer`` x ``per`` times coarser in the next sweep; False
        where the group is blocked for good and its units stay as they are (see DependencyAnalysis)."""
        root = self.root[group]
        if root in self.unsplittable:
            return False
        a, b = self.coarsen.get(root, (1, 1))
        self.coarsen[root] = (math.lcm(a, outer), math.lcm(b, per))
        return True

    def retry_coarser(self, group: int, outer: int, per: int) -> None:
        """Coarsen the group's units and follow this node again in the next sweep (raises)."""
        if self.request_coarsen(group, outer, per):
            raise _Retry
        raise Unsupported(_TOO_COARSE)

    def add_slice(self, segment: Segment, offset: int, param: str, dim: int, role: str, node: fx.Node) -> None:
        if segment.group is not None and segment.layout.batched:
            raise Unsupported("reads channels folded into the batch with a stored tensor")
        if segment.group is not None:
            self.slices.setdefault(self.root[segment.group], []).append(
                Slice(param, dim, offset, segment.layout, role, node))

    # -- the sweep --------------------------------------------------------------------------------

    def run(self) -> None:
        for node in self.graph.fx_graph.nodes:
            if node.op == "call_function":
                try:
                    self.tracks[node] = self.visit(node)
                except _Retry:
                    self.tracks[node] = None  # the next sweep, under coarser units, follows it
                except Unsupported as why:
                    for source in node.all_input_nodes:
                        self.block(self.tracks.get(source), node, str(why))
                    self.tracks[node] = None
            elif node.op == "call_module":
                for source in node.all_input_nodes:
                    self.block(self.tracks.get(source), node, "is a submodule call the analysis cannot see into")
            elif node.op == "output":
                for source in node.all_input_nodes:
                    if source in self.input_writes:
                        continue  # the caller takes the input back at the size it gave
                    self.block(self.tracks.get(source), node, "reaches the model's output, whose shape must stay")

    def visit(self, node: fx.Node) -> Any:
        target = node.target
        inputs = {a: self.tracks.get(a) for a in node.all_input_nodes}
        tracked = {a: t for a, t in inputs.items() if t is not None}
        if target in CONV_OPS and _is_depthwise(self.graph, node):
            return self.depthwise(node, tracked)
        if target in LINEAR_OPS or target in CONV_OPS:
            return self.layer(node, tracked)
        if not tracked:
            return None
        if target in _IGNORED_READS:
            return None
        if target is operator.getitem:
            source, index = node.args
            return self.tracks[source][index] if isinstance(self.tracks[source], list) else _unsupported(node)
        if target == aten.sym_size.int:
            if node.args[1] % len(_shape(node.args[0])) == _single(tracked).dim:
                raise Unsupported("reads the size of the channel dimension at run time")
            return None
        if target in _UNARY:
            return self.keep(node, inputs[node.args[0]])
        if target == aten.prelu.default:
            return self.prelu(node, inputs[node.args[0]])
        if target in _ELEMENTWISE or target == aten.where.self:
            return self.elementwise(node, tracked)
        if target in _RESHAPES:
            return self.reshape(node, _single(tracked))
        if target in _MOVES or target in _INDEXING:
            return self.move(node, _single(tracked))
        if target in _REDUCTIONS or target in (aten.softmax.int, aten._softmax.default, aten.log_softmax.int):
            return self.reduce(node, _single(tracked))
        if target in _PER_CHANNEL_SPATIAL or target == aten.max_pool2d_with_indices.default:
            track = _single(tracked)
            if track.dim != 1:
                raise Unsupported("pools or resizes along the channel dimension")
            return [track, track] if target == aten.max_pool2d_with_indices.default else track
        if target in BATCH_NORMS:
            return self.batch_norm(node, _single(tracked))
        if target == aten.layer_norm.default:
            track = _single(tracked)
            if track.dim >= len(_shape(node)) - len(node.args[1]):
                raise Unsupported("normalizes over the channels: removing some changes the statistics of the rest")
            return track
        if target == aten.cat.default:
            return self.cat(node)
        if target in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default):
            return self.split(node, _single(tracked))
        if target == aten.scaled_dot_product_attention.default:
            return self.attention_op(node)
        if target == aten.index_copy.default and node.args[0].op == "placeholder":
            return self.input_write(node, tracked)
        raise Unsupported(f"no channel rule for {target}")

    # -- rules ------------------------------------------------------------------------------------

    def input_write(self, node: fx.Node, tracked: dict[fx.Node, Track]) -> Track:
        """``index_copy(input, dim, index, source)``: the source's channels written into a graph input
        (a decoder's KV cache) at positions along another dimension. The input is cut with them where
        its caller allocates it from the graph's shapes; the written tensor then holds the channels."""
        target_input, dim, _, source = node.args
        if target_input.name not in self.a.resizable_inputs:
            raise Unsupported(f"writes the channels into the input '{target_input.name}', which the caller "
                              f"allocates at its present size")
        if set(tracked) != {source}:
            raise Unsupported("indexes positions with the channels, or writes some into an input")
        track = tracked[source]
        if dim % len(_shape(node)) == track.dim:
            raise Unsupported("writes along the channel dimension")
        others = [u for u in target_input.users if u is not node and u.target != GUARDS and not (
            u.target == aten.sym_size.int and u.args[1] % len(_shape(node)) != track.dim)]
        if others:
            raise Unsupported(f"writes the channels into the input '{target_input.name}', which '{others[0].name}' "
                              f"reads as it is")
        for segment, offset in zip(track.segments, track.offsets()):
            self.add_slice(segment, offset, target_input.name, track.dim, "input", node)
        self.input_writes.add(node)
        return track

    def layer(self, node: fx.Node, tracked: dict[fx.Node, Track]) -> Track | None:
        weight = node.args[1]
        conv = node.target in CONV_OPS
        usable = self.graph.is_parameter(weight) and self.a.readers.get(weight.target, 0) == 1
        groups = _conv_groups(node)[1] if conv else 1
        if tracked:
            try:
                self.consume(node, tracked, usable, groups)
            except _Retry:
                raise
            except Unsupported as why:
                for track in tracked.values():
                    self.block(track, node, str(why))
        producer = self.a.producer_ids.get(node)
        if producer is None:
            return None
        if not usable or groups is None:
            why = "is a transposed convolution" if groups is None else (
                f"its weight '{weight.target}' is read by {self.a.readers.get(weight.target, 0)} ops (shared "
                f"between layers), and cutting it for one would cut it for all")
            self.blocked.setdefault(self.root[producer], []).append((node.name, why))
            return None
        width = self.graph.param(weight.target).shape[0]
        outer, per = self.a.units[producer]
        if outer % groups:  # every block of a grouped conv's output keeps the same width
            if self.request_coarsen(producer, groups // math.gcd(outer, groups), 1):
                raise _Retry
            self.blocked.setdefault(self.root[producer], []).append((node.name, _TOO_COARSE))
            return None
        if width % (outer * per):
            self.blocked.setdefault(self.root[producer], []).append(
                (node.name, f"its {width} channels cannot be cut in units of {outer} x {per}"))
            outer, per = 1, width
        segment = Segment(producer, Layout(outer, width // (outer * per), per))
        self.add_slice(segment, 0, weight.target, 0, "producer", node)
        bias = node.args[2] if len(node.args) > 2 else None
        if bias is not None:
            if not self.graph.is_tensor_attr(bias) or self.a.readers.get(bias.target, 0) != 1:
                self.blocked.setdefault(self.root[producer], []).append((node.name, "its bias is not its own"))
            else:
                self.add_slice(segment, 0, bias.target, 0, "producer", node)
        return Track(1 if conv else len(_shape(node)) - 1, (segment,))

    def depthwise(self, node: fx.Node, tracked: dict[fx.Node, Track]) -> Track | None:
        """A depthwise convolution filters each channel on its own, so its channels are its input's: its
        filters, bias and ``groups`` are cut with them (MobileNet's and EfficientNet's blocks)."""
        if not tracked:
            return None
        x, weight, bias = node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else None
        track = tracked.get(x)
        if len(tracked) > 1 or track is None:
            raise Unsupported("its weight or bias carries pruned channels")
        if track.dim != 1:
            raise Unsupported("reads the channels along a dimension it does not filter")
        own = [t for t in (weight, bias) if t is not None]
        if not all(self.graph.is_tensor_attr(t) and self.a.readers.get(t.target, 0) == 1 for t in own):
            raise Unsupported("is a depthwise convolution whose weight or bias is not a tensor of its own")
        index = _conv_groups(node)[0]
        for segment, offset in zip(track.segments, track.offsets()):
            for tensor in own:
                self.add_slice(segment, offset, tensor.target, 0, "attached", node)
            if segment.group is not None:  # groups counts the channels: each run cut takes its share off
                self.shape_args.setdefault(self.root[segment.group], []).append(
                    ShapeArg(node, None, offset, segment.layout, arg=index))
        return Track(1, track.segments)

    def consume(self, node: fx.Node, tracked: dict[fx.Node, Track], usable: bool, groups: int) -> None:
        x, weight = node.args[0], node.args[1]
        conv = node.target in CONV_OPS
        track = tracked.get(x)
        if len(tracked) > 1 or track is None:
            raise Unsupported("its weight or bias carries pruned channels")
        if track.dim != (1 if conv else len(_shape(x)) - 1):
            raise Unsupported("reads the channels along a dimension it does not contract")
        if not usable:
            raise Unsupported(f"its weight '{getattr(weight, 'target', weight)}' is not a parameter read by "
                              f"this layer alone")
        if groups is None:
            raise Unsupported("is a transposed convolution")
        if groups != 1:
            self.consume_grouped(node, track, groups)
            return
        for segment, offset in zip(track.segments, track.offsets()):
            self.add_slice(segment, offset, weight.target, 1, "consumer", node)
            if segment.group is not None:
                self.consumers.setdefault(self.root[segment.group], []).append(
                    Consumer(node, x, track.dim, offset, segment.layout))

    def consume_grouped(self, node: fx.Node, track: Track, groups: int) -> None:
        """A grouped conv reads each of its ``groups`` input blocks with its own filters, indexed within
        the block: a unit must be the same positions in every block, and its weight loses them once."""
        if len(track.segments) != 1:
            raise Unsupported("is a grouped convolution reading channels of several runs")
        segment = track.segments[0]
        if segment.group is None:
            return
        layout = segment.layout
        if layout.outer % groups:
            self.retry_coarser(segment.group, groups // math.gcd(layout.outer, groups), 1)
        within = Segment(segment.group, Layout(layout.outer // groups, layout.units, layout.per, layout.batched))
        self.add_slice(within, 0, node.args[1].target, 1, "consumer", node)
        self.consumers.setdefault(self.root[segment.group], []).append(
            Consumer(node, node.args[0], track.dim, 0, layout, groups))

    def prelu(self, node: fx.Node, track: Track | None) -> Track:
        """PReLU: one learned slope per channel of dimension 1 (or one for all), cut with the channels."""
        slopes = node.args[1]
        if track is None:
            raise Unsupported("carries the channels in its slopes")
        if _shape(slopes) in ([1], []):
            return track
        if track.dim != 1:
            raise Unsupported("applies its slopes along a dimension other than the channels")
        if not (self.graph.is_tensor_attr(slopes) and self.a.readers.get(slopes.target, 0) == 1):
            raise Unsupported(f"has slopes '{slopes.name}' that are not a tensor of its own")
        for segment, offset in zip(track.segments, track.offsets()):
            self.add_slice(segment, offset, slopes.target, 0, "attached", node)
        return track

    def keep(self, node: fx.Node, track: Track | None) -> Track:
        if track is None:
            raise Unsupported("carries the channels in an argument it does not pass through")
        return track

    def elementwise(self, node: fx.Node, tracked: dict[fx.Node, Track]) -> Track:
        rank = len(_shape(node))
        aligned = {a: (t.dim + rank - len(_shape(a)), t) for a, t in tracked.items()}
        dims = {d for d, _ in aligned.values()}
        if len(dims) != 1:
            raise Unsupported("combines channels that lie along different dimensions")
        dim = dims.pop()
        tracks = [t for _, t in aligned.values()]
        if len({tuple(s.layout.size for s in t.segments) for t in tracks}) > 1:
            # runs of different lengths (GhostNet: a conv's 2L channels added to [A, A], a module's L
            # channels and their depthwise filtering side by side) meet where each is cut into equal runs
            cuts = {offset for t in tracks for offset in t.offsets()[1:]}
            tracks = [self.refined(t, cuts) for t in tracks]
        first = tracks[0]
        for other in tracks[1:]:
            self.tie(first, other, node)
        for arg in node.args:
            if not isinstance(arg, fx.Node) or arg in tracked:
                continue
            shape = _shape(arg)
            if shape is None:
                continue
            own_dim = dim - (rank - len(shape))
            if own_dim < 0 or shape[own_dim] == 1:
                continue  # broadcast along the channels: nothing to cut
            if not (self.graph.is_tensor_attr(arg) and self.a.readers.get(arg.target, 0) == 1
                    and len(first.segments) == 1):
                raise Unsupported(f"adds or multiplies channels with '{arg.name}', which cannot be cut with them")
            self.add_slice(first.segments[0], 0, arg.target, own_dim, "attached", node)
        return Track(dim, first.segments)

    def refined(self, track: Track, cuts: set[int]) -> Track:
        """``track`` with its segments split at the offsets ``cuts``: a segment only into ``k`` runs of
        equal length, each then ``outer / k`` of its outer index (the group is coarsened until ``outer``
        is a multiple of ``k``), so that its unit ``u`` is channel ``u`` of every run."""
        segments: list[Segment] = []
        for segment, start in zip(track.segments, track.offsets()):
            size, layout = segment.layout.size, segment.layout
            inside = sorted(c - start for c in cuts if start < c < start + size)
            k = len(inside) + 1
            if k == 1:
                segments.append(segment)
                continue
            if size % k or inside != [size * i // k for i in range(1, k)]:
                raise Unsupported("combines channel runs of different lengths")
            if segment.group is None:
                segments += [Segment(None, Layout(1, size // k, 1))] * k
                continue
            if layout.outer % k:
                self.retry_coarser(segment.group, k // math.gcd(layout.outer, k), 1)
            piece = Layout(layout.outer // k, layout.units, layout.per, layout.batched)
            segments += [Segment(segment.group, piece)] * k
        return Track(track.dim, tuple(segments))

    def tie(self, one: Track, other: Track, node: fx.Node) -> None:
        """Two tensors whose channels meet element by element: their segments must be cut alike."""
        if [s.layout.size for s in one.segments] != [s.layout.size for s in other.segments]:
            raise Unsupported("combines channel runs of different lengths")
        for a, b in zip(one.segments, other.segments):
            if a.group is None and b.group is None:
                continue
            if a.group is None or b.group is None:
                self.block(Track(0, (a, b)), node, "ties pruned channels to channels that cannot be pruned")
                continue
            outer, per = math.lcm(a.layout.outer, b.layout.outer), math.lcm(a.layout.per, b.layout.per)
            for s in (a, b):
                if (s.layout.outer, s.layout.per) != (outer, per):
                    self.request_coarsen(s.group, outer // s.layout.outer, per // s.layout.per)
            if self.root[a.group] != self.root[b.group]:
                self.couple.append((a.group, b.group))

    def reshape(self, node: fx.Node, track: Track) -> Track:
        before, after = _shape(node.args[0]), _shape(node)
        blocks = _reshape_blocks(before, after)
        block = next(b for b in blocks if track.dim in b[0])
        ins, outs = block
        if len(ins) == 1 and len(outs) == 1:
            self.size_arg(node, outs[0], track)
            return Track(outs[0], track.segments)
        if len(track.segments) != 1 or track.segments[0].group is None:
            raise Unsupported("reshapes a dimension made of several channel runs")
        segment = track.segments[0]
        layout = segment.layout
        static, symbolic_in, batched = self.batch_factor(node, track, ins, outs)
        inner = [d for d in ins if d != track.dim and d not in symbolic_in]
        outer = layout.outer * math.prod(before[d] for d in inner if d < track.dim)
        per = layout.per * math.prod(before[d] for d in inner if d > track.dim)
        factors = [d for d in outs if static[d] > 1]
        if len(factors) == 2 and self.indexed(node, factors[0]):
            # [..., k * E] -> [..., k, E] and the k parts picked apart later (nn.MultiheadAttention's fused
            # q/k/v projection): the units lie in E, once in each part
            chosen = factors[1]
        else:
            chosen = factors[-2] if len(factors) >= 2 else (factors[0] if factors else outs[-1])
        head = math.prod(static[d] for d in outs if d < chosen)
        tail = math.prod(static[d] for d in outs if d > chosen)
        if outer % head or per % tail:
            self.retry_coarser(segment.group, math.lcm(outer, head) // outer, math.lcm(per, tail) // per)
        new = Track(chosen, (Segment(segment.group, Layout(outer // head, layout.units, per // tail, batched)),))
        self.size_arg(node, chosen, new)
        return new

    def batch_factor(self, node: fx.Node, track: Track, ins: list[int], outs: list[int]
                     ) -> tuple[dict[int, int], set[int], bool]:
        """The sizes of a reshape's output dims ``outs`` without the run-time factor it moves into or out
        of the channel dimension, the input dims of run-time size, and whether the result holds the
        factor. Only a batch folded in front of the channels and taken out again is followed
        (``[T, B, E] -> [T, B * H, D]``, ``[B * H, T, D] -> [B, H, T, D]``)."""
        after = _shape(node)
        static = {d: after[d] for d in outs}
        symbolic_in = _symbolic_dims(node.args[0]) & set(ins)
        symbolic_out = _symbolic_dims(node) & set(outs)
        batched = track.segments[0].layout.batched
        if not symbolic_in and not symbolic_out:
            return static, symbolic_in, batched
        before = _shape(node.args[0])
        folds = (not batched and symbolic_in and track.dim not in symbolic_in
                 and all(d < track.dim for d in symbolic_in) and symbolic_out == {outs[0]})
        unfolds = (batched and symbolic_in == {track.dim} and symbolic_out
                   and symbolic_out == set(outs[:len(symbolic_out)]))
        if folds:
            static[outs[0]] //= math.prod(before[d] for d in symbolic_in)
            return static, symbolic_in, True
        if unfolds:
            static.update(dict.fromkeys(symbolic_out, 1))
            return static, symbolic_in, False
        raise Unsupported("merges the channels with a dimension of run-time size")

    def indexed(self, node: fx.Node, dim: int) -> bool:
        """Whether a later op picks dimension ``dim`` of ``node`` apart by index (select, unbind),
        following it through moves only."""
        stack = [(node, dim)]
        while stack:
            current, d = stack.pop()
            for user in current.users:
                if user.op != "call_function" or user.args[0] is not current:
                    continue
                if user.target in _INDEXING:
                    if (user.args[1] if len(user.args) > 1 else 0) % len(_shape(current)) == d:
                        return True
                elif user.target in _UNARY:
                    stack.append((user, d))
                elif user.target in _MOVES:
                    try:
                        stack.append((user, self.move(user, Track(d, ())).dim))
                    except Unsupported:
                        continue  # squeezed away or sized: not picked apart here
        return False

    def size_arg(self, node: fx.Node, dim: int, track: Track) -> None:
        """Record the entry of a view/reshape/expand/unflatten size list that gives the channel dimension's size."""
        if node.target not in (*VIEW_OPS, aten.expand.default, aten.unflatten.int):
            return
        arg, position = 1, dim
        if node.target == aten.unflatten.int:  # (self, dim, sizes): the sizes of the dims from that dim on
            arg, position = 2, dim - node.args[1] % len(_shape(node.args[0]))
            if not 0 <= position < len(node.args[2]):
                return  # the channels lie in a dimension the unflatten leaves as it is
        size = node.args[arg][position]
        if size == -1:
            return
        if len(track.segments) != 1:
            raise Unsupported("gives the size of a dimension made of several channel runs")
        segment = track.segments[0]
        factor = None
        if isinstance(size, fx.Node):
            factor = _static_factor(size, segment.layout.size) if segment.layout.batched else None
            if factor is None:
                raise Unsupported("sizes the channel dimension with a value computed at run time")
        if segment.group is not None:
            self.shape_args.setdefault(self.root[segment.group], []).append(
                ShapeArg(node, position, 0, segment.layout, arg, factor))

    def move(self, node: fx.Node, track: Track) -> Any:
        target, args = node.target, node.args
        rank_in = len(_shape(args[0]))
        if target == aten.transpose.int:
            a, b = (d % rank_in for d in args[1:3])
            return Track({a: b, b: a}.get(track.dim, track.dim), track.segments)
        if target == aten.t.default:
            return Track(rank_in - 1 - track.dim, track.segments) if rank_in == 2 else track
        if target == aten.permute.default:
            order = [d % rank_in for d in args[1]]
            return Track(order.index(track.dim), track.segments)
        if target == aten.unsqueeze.default:
            d = args[1] % (rank_in + 1)
            return Track(track.dim + (d <= track.dim), track.segments)
        if target in (aten.squeeze.dim, aten.squeeze.default):
            before = _shape(args[0])
            gone = [d % rank_in for d in ([args[1]] if target == aten.squeeze.dim else range(rank_in))
                    if before[d % rank_in] == 1]
            if track.dim in gone:
                raise Unsupported("squeezes the channel dimension away")
            return Track(track.dim - sum(d < track.dim for d in gone), track.segments)
        if target == aten.expand.default:
            rank_out = len(args[1])
            new = Track(track.dim + rank_out - rank_in, track.segments)
            self.size_arg(node, new.dim, new)
            return new
        dim = args[1] % rank_in if len(args) > 1 else 0
        if dim == track.dim:
            raise Unsupported("indexes along the channel dimension")
        if target == aten.slice.Tensor:
            return track
        moved = Track(track.dim - (dim < track.dim), track.segments)
        if target == aten.unbind.int:
            return [moved] * _shape(args[0])[dim]
        return moved

    def reduce(self, node: fx.Node, track: Track) -> Track:
        rank = len(_shape(node.args[0]))
        if node.target in (aten.softmax.int, aten._softmax.default, aten.log_softmax.int):
            if node.args[1] % rank == track.dim:
                raise Unsupported("normalizes over the channels")
            return track
        dims = node.args[1] if len(node.args) > 1 else None
        dims = list(range(rank)) if not dims else [d % rank for d in ([dims] if isinstance(dims, int) else dims)]
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if track.dim in dims:
            raise Unsupported("reduces over the channels")
        return track if keepdim else Track(track.dim - sum(d < track.dim for d in dims), track.segments)

    def batch_norm(self, node: fx.Node, track: Track) -> Any:
        if track.dim != 1:
            raise Unsupported("normalizes along another dimension than the channels")
        for arg in node.args[1:5]:
            if arg is None:
                continue
            if not self.graph.is_tensor_attr(arg) or self.a.readers.get(arg.target, 0) != 1:
                raise Unsupported(f"reads '{arg}', which is not a tensor of its own")
            for segment, offset in zip(track.segments, track.offsets()):
                self.add_slice(segment, offset, arg.target, 0, "attached", node)
        return [track, None, None] if node.target != aten.batch_norm.default else track

    def cat(self, node: fx.Node) -> Track:
        parts = node.args[0]
        rank = len(_shape(node))
        dim = (node.args[1] if len(node.args) > 1 else 0) % rank
        tracks = [self.tracks.get(p) for p in parts]
        known = [t for t in tracks if t is not None]
        if dim not in {t.dim for t in known}:
            # joined along another dimension: every part must carry the same channels
            if any(t is None for t in tracks) or len({t.dim for t in known}) != 1:
                raise Unsupported("joins pruned channels with a tensor that cannot be cut with them")
            for other in known[1:]:
                self.tie(known[0], other, node)
            return known[0]
        if len({t.dim for t in known}) != 1:
            raise Unsupported("joins tensors whose channels lie along different dimensions")
        segments: list[Segment] = []
        for part, track in zip(parts, tracks):
            if track is None:
                segments.append(Segment(None, Layout(1, _shape(part)[dim], 1)))
            else:
                segments.extend(track.segments)
        return Track(dim, tuple(segments))

    def split(self, node: fx.Node, track: Track) -> list[Track]:
        rank = len(_shape(node.args[0]))
        dim = (node.args[2] if len(node.args) > 2 else 0) % rank
        if dim != track.dim:
            return [track] * len(node.meta["val"])
        total = sum(s.layout.size for s in track.segments)
        if node.target == aten.split_with_sizes.default:
            sizes = list(node.args[1])
        else:
            step = node.args[1] if node.target == aten.split.Tensor else -(-total // node.args[1])
            sizes = [min(step, total - i) for i in range(0, total, step)]
        if len(track.segments) == 1 and track.segments[0].group is not None and len(set(sizes)) == 1:
            segment = track.segments[0]
            layout = segment.layout
            if layout.outer % len(sizes):
                self.retry_coarser(segment.group, math.lcm(layout.outer, len(sizes)) // layout.outer, 1)
            if node.target == aten.split_with_sizes.default:
                raise Unsupported("splits the channels at fixed sizes")
            if layout.batched:
                raise Unsupported("splits channels folded into the batch")
            piece = Segment(segment.group, Layout(layout.outer // len(sizes), layout.units, layout.per))
            if node.target == aten.split.Tensor:  # its argument is a piece's size; chunk's, the piece count, stays
                self.shape_args.setdefault(self.root[segment.group], []).append(ShapeArg(node, None, 0, piece.layout))
            return [Track(dim, (piece,))] * len(sizes)
        offsets = track.offsets() + [total]
        if node.target != aten.split_with_sizes.default or \
                [sum(sizes[:i]) for i in range(len(sizes) + 1)] != [o for o in offsets if o <= total]:
            raise Unsupported("splits the channels where channel runs do not begin")
        for position, segment in enumerate(track.segments):
            if segment.group is not None:
                self.shape_args.setdefault(self.root[segment.group], []).append(
                    ShapeArg(node, position, 0, segment.layout))
        return [Track(dim, (segment,)) for segment in track.segments]

    def attention_op(self, node: fx.Node) -> Track:
        if node.kwargs.get("enable_gqa"):
            raise Unsupported("repeats key/value heads inside attention (enable_gqa)")
        q, k, v = node.args[:3]
        tracks = [self.tracks.get(a) for a in (q, k, v)]
        if any(t is None for t in tracks):
            raise Unsupported("mixes pruned heads with heads that cannot be pruned")
        heads = len(_shape(q)) - 3
        if any(t.dim != heads for t in tracks):
            raise Unsupported("carries channels along a dimension other than the heads")
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if isinstance(mask, fx.Node):
            shape = _shape(mask)
            own = heads - (len(_shape(q)) - len(shape))
            if own >= 0 and shape[own] != 1:
                sizes = self.repeated_mask(mask, own, tracks[0]) if len(tracks[0].segments) == 1 else None
                if sizes is None:
                    raise Unsupported("applies a mask of its own to every head")
                group = tracks[0].segments[0].group
                if group is not None:
                    self.shape_args.setdefault(self.root[group], []).extend(sizes)
        self.tie(tracks[0], tracks[1], node)
        self.tie(tracks[0], tracks[2], node)
        for segment in tracks[0].segments:
            if segment.group is not None:
                self.attention.add(self.root[segment.group])
        return Track(heads, tracks[0].segments)


    def repeated_mask(self, mask: fx.Node, dim: int, track: Track) -> list[ShapeArg] | None:
        """Where ``mask`` is one mask expanded to every head along ``dim`` (nn.MultiheadAttention's
        padding mask, reshaped through the heads folded into the batch on the way), the sizes that
        count the heads, which shrink with them; None for a mask that differs from head to head."""
        layout = track.segments[0].layout
        sizes, node, batched = [], mask, False
        while node.op == "call_function" and len(node.users) == 1:
            shape, before = _shape(node), _shape(node.args[0])
            if node.target == aten.expand.default:
                lead = len(shape) - len(before)
                if batched or dim < lead or before[dim - lead] != 1 or not isinstance(node.args[1][dim], int):
                    return None
                return sizes + [ShapeArg(node, dim, 0, layout)]
            if node.target not in VIEW_OPS:
                return None
            ins, outs = next(b for b in _reshape_blocks(before, shape) if dim in b[1])
            size, position = node.args[1][dim], dim
            if not batched and len(ins) == 1 and outs == [dim - 1, dim] and dim - 1 in _symbolic_dims(node):
                dim, batched = ins[0], True  # [B * H, ...] -> [B, H, ...]: before, the heads lay in the batch
            elif batched and outs == [dim] and len(ins) == 2 and ins[0] in _symbolic_dims(node.args[0]):
                dim, batched = ins[1], False  # [B, H, ...] -> [B * H, ...]
                factor = _static_factor(size, layout.size) if isinstance(size, fx.Node) else None
                if factor is None:
                    return None
                sizes.append(ShapeArg(node, position, 0, layout, 1, factor))
                node = node.args[0]
                continue
            elif len(ins) == 1 and outs == [dim] and before[ins[0]] == shape[dim]:
                dim = ins[0]
            else:
                return None
            if isinstance(size, fx.Node):
                return None
            if size != -1:
                sizes.append(ShapeArg(node, position, 0, layout))
            node = node.args[0]
        return None


_TOO_COARSE = "the ops its channels pass ask for units coarser than its layers' widths"


class _Retry(Unsupported):
    """The units of a group were coarsened: the sweep goes on, and a next one redoes this node."""

    def __init__(self) -> None:
        super().__init__("")


def _unsupported(node: fx.Node) -> Any:
    raise Unsupported(f"reads an output of {node.args[0].target} that the analysis does not follow")


def _static_factor(size: fx.Node, channels: int) -> int | None:
    """Where ``size`` is a run-time size times the int ``channels`` (``B * heads``), the position of
    the int in its args."""
    if size.op != "call_function" or size.target is not operator.mul or len(size.args) != 2:
        return None
    ints = [i for i, a in enumerate(size.args) if isinstance(a, int)]
    return ints[0] if len(ints) == 1 and size.args[ints[0]] == channels else None


def _conv_groups(node: fx.Node) -> tuple[int, Any]:
    """A convolution's ``groups``: its position in the node's args and its value (1 when not given). A
    transposed ``aten.convolution`` gives None: its weight is laid out [in, out], which no rule here reads."""
    index = 8 if node.target == aten.convolution.default else 6
    if node.target == aten.convolution.default and node.args[6]:
        return index, None
    return index, node.args[index] if len(node.args) > index else 1


def _is_depthwise(graph: Graph, node: fx.Node) -> bool:
    """Whether a convolution node filters every channel on its own with a stored weight: as many groups
    as input and output channels, given positionally (so that a cut can change it)."""
    index, groups = _conv_groups(node)
    if not (isinstance(groups, int) and groups > 1 and len(node.args) > index and graph.is_tensor_attr(node.args[1])):
        return False
    weight, x = graph.param(node.args[1].target).shape, _shape(node.args[0])
    return x is not None and weight[0] == groups and weight[1] == 1 and x[1] == groups


def _single(tracked: dict[fx.Node, Track]) -> Track:
    if len(tracked) != 1:
        raise Unsupported("takes channels of more than one tensor")
    return next(iter(tracked.values()))


def _groups_of(track: Any) -> set[int]:
    if track is None:
        return set()
    if isinstance(track, list):
        return set().union(*(_groups_of(t) for t in track))
    return {s.group for s in track.segments if s.group is not None}


def _reshape_blocks(before: list[int], after: list[int]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of input dims with runs of output dims of equal element count, left to right: a
    reshape only merges and splits dims within such runs."""
    blocks, i, j = [], 0, 0
    while i < len(before) or j < len(after):
        ins, outs, size_in, size_out = [], [], 1, 1
        if i < len(before):
            size_in, i = before[i], i + 1
            ins.append(i - 1)
        if j < len(after):
            size_out, j = after[j], j + 1
            outs.append(j - 1)
        while size_in != size_out:
            if size_in < size_out and i < len(before):
                size_in, i = size_in * before[i], i + 1
                ins.append(i - 1)
            elif size_out < size_in and j < len(after):
                size_out, j = size_out * after[j], j + 1
                outs.append(j - 1)
            else:
                raise Unsupported("reshapes in a way the analysis cannot follow")
        blocks.append((ins, outs))
    return blocks


class DependencyAnalysis:
    """The channel groups of ``graph``: build it, then read :attr:`groups`. The coupling of producers
    is a networkx graph (:attr:`coupling`, one node per producer, an edge where two are tied)."""

    MAX_SWEEPS = 200

    def __init__(self, graph: Graph, resizable_inputs: frozenset[str] = frozenset()) -> None:
        self.graph = graph
        # graph inputs the caller allocates from the graph's own shapes (a decoder's KV cache): the channels
        # written into one cut it too, and the write may reach the graph's outputs
        self.resizable_inputs = resizable_inputs
        self.readers = read_counts(graph)
        # a depthwise convolution passes its input's channels on (see _Pass.depthwise): not a producer
        producers = [n for n in graph.nodes(op="call_function", target=LINEAR_OPS + CONV_OPS)
                     if graph.is_parameter(n.args[1]) and not (n.target in CONV_OPS and _is_depthwise(graph, n))]
        self.producer_ids = {node: i for i, node in enumerate(producers)}
        self.producers = producers
        self.units: dict[int, tuple[int, int]] = {i: (1, 1) for i in self.producer_ids.values()}
        # producers whose group was asked for units coarser than some member's width can hold
        self.unsplittable: set[int] = set()
        self.coupling = nx.Graph()
        self.coupling.add_nodes_from((i, {"node": node.name}) for node, i in self.producer_ids.items())
        self.groups = self._analyse()

    def roots(self) -> dict[int, int]:
        """Each producer's group: the smallest producer id of its connected component."""
        root = {}
        for component in nx.connected_components(self.coupling):
            first = min(component)
            root.update({member: first for member in component})
        return root

    def _analyse(self) -> list[ChannelGroup]:
        for _ in range(self.MAX_SWEEPS):
            sweep = _Pass(self)
            sweep.run()
            if not sweep.coarsen and not sweep.couple:
                return self._groups(sweep)
            for root, (outer, per) in sweep.coarsen.items():
                members = [member for member, member_root in sweep.root.items() if member_root == root]
                coarser = {m: (self.units[m][0] * outer, self.units[m][1] * per) for m in members}
                # Units that no longer divide a member's channels can never divide them again (they only
                # grow): the group is left alone as it is, instead of coarsened sweep after sweep (a
                # tie between one unit laid out as [192, 1, 1] and one as [1, 1, 192] never settles).
                if any(self._width(m) % (a * b) for m, (a, b) in coarser.items()):
                    self.unsplittable.update(members)
                else:
                    self.units.update(coarser)
            for a, b in sweep.couple:
                self.coupling.add_edge(a, b, node="tied")
        groups = self._groups(sweep)
        for group in groups:  # never expected; leaving everything alone is always safe
            group.blocked.append((group.producers[0].name, "the analysis did not settle on a unit"))
        return groups

    def _width(self, member: int) -> int:
        return self.graph.param(self.producers[member].args[1].target).shape[0]

    def _groups(self, sweep: _Pass) -> list[ChannelGroup]:
        groups = []
        for root in sorted(set(sweep.root.values())):
            members = sorted(m for m, r in sweep.root.items() if r == root)
            producers = [self.producers[m] for m in members]
            slices = sweep.slices.get(root, [])
            units = {s.layout.units for s in slices}
            conv = all(p.target in CONV_OPS for p in producers)
            kind = "heads" if root in sweep.attention else ("conv" if conv else "mlp")
            group = ChannelGroup(name=self.producers[root].args[1].target, kind=kind,
                                 units=units.pop() if len(units) == 1 else 0, producers=producers,
                                 slices=slices, shape_args=sweep.shape_args.get(root, []),
                                 consumers=sweep.consumers.get(root, []), blocked=sweep.blocked.get(root, []))
            if root in sweep.unsplittable:
                group.blocked.append((producers[0].name, _TOO_COARSE))
            if not group.consumers and not group.blocked:
                group.blocked.append((producers[0].name, "its channels are never read by a layer"))
            if group.units == 0 and not group.blocked:
                group.blocked.append((producers[0].name, "its members do not agree on the number of units"))
            groups.append(group)
        return groups

    def removed_params(self, removed_units: dict[str, int]) -> int:
        """How many stored elements pruning ``removed_units`` (units per group name) removes."""
        cut: dict[tuple[str, int], int] = {}
        for group in self.groups:
            dropped = removed_units.get(group.name, 0)
            for s in group.slices:
                if s.role == "input":  # a graph input, not stored
                    continue
                key = (s.param, s.dim)
                cut[key] = cut.get(key, 0) + dropped * s.layout.outer * s.layout.per
        removed = 0
        for name in {p for p, _ in cut}:
            shape = list(self.graph.param(name).shape)
            new = [size - cut.get((name, d), 0) for d, size in enumerate(shape)]
            removed += math.prod(shape) - math.prod(new)
        return removed


def channel_groups(graph: Graph) -> list[ChannelGroup]:
    """The groups of coupled channels of ``graph`` (see the module docstring)."""
    return DependencyAnalysis(graph).groups
