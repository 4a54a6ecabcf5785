"""The channel dependency analysis: which producers are tied, in what units, and which groups it
leaves alone, on small models built for each coupling."""

from __future__ import annotations

import torch
from torch import nn

from bevel.ir import analysis, capture
from bevel.ir.dependency import DependencyAnalysis, Layout
from bevel.passes import PassContext, get_pass
from tests.models_zoo import MLP, SDPABlock
from tests.passes.test_prune_structured import ResidualConvNet, ResolutionFusionNet


def groups_of(model, *example):
    graph = capture(model.eval(), example)
    return graph, {g.name: g for g in DependencyAnalysis(graph).groups}


def test_linear_activation_linear_is_one_neuron_group_and_the_last_layer_is_blocked():
    _, groups = groups_of(MLP((16, 32, 8)), torch.randn(2, 16))
    hidden = groups["layers.0.weight"]
    assert hidden.kind == "mlp" and hidden.units == 32 and not hidden.blocked
    assert [c.node.args[1].target for c in hidden.consumers] == ["layers.1.weight"]
    assert {(s.param, s.dim) for s in hidden.slices} == {("layers.0.weight", 0), ("layers.0.bias", 0),
                                                         ("layers.1.weight", 1)}
    assert "output" in groups["layers.1.weight"].blocked[0][1]


def test_residual_add_ties_every_member_and_batchnorm_follows_its_conv():
    _, groups = groups_of(ResidualConvNet(width=8), torch.randn(2, 1, 8, 8))
    residual = groups["stem.0.weight"]
    assert [p.args[1].target for p in residual.producers] == ["stem.0.weight", "block.3.weight"]
    cut = {(s.param, s.dim) for s in residual.slices}
    assert {("stem.1.running_mean", 0), ("block.4.running_var", 0), ("block.0.weight", 1),
            ("down.0.weight", 1)} <= cut
    inner = groups["block.0.weight"]
    assert inner.kind == "conv" and inner.units == 8 and [c.node.args[1].target for c in inner.consumers] == \
        ["block.3.weight"]


def test_concat_and_split_keep_each_branch_at_its_offset():
    class Branches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1)
            self.fused = nn.Linear(8, 12)
            self.merge, self.out = nn.Conv2d(10, 5, 1), nn.Linear(6, 3)

        def forward(self, x):
            y = self.merge(torch.cat([torch.relu(self.a(x)), self.b(x)], dim=1)).mean(dim=(2, 3))
            gate, up = self.fused(torch.randn_like(y[:, :1]).expand(-1, 8) + 1).chunk(2, dim=-1)
            return y.sum(-1, keepdim=True) + self.out(gate * up)

    _, groups = groups_of(Branches(), torch.randn(2, 3, 4, 4))
    a, b = groups["a.weight"], groups["b.weight"]
    assert not a.blocked and not b.blocked
    assert [(s.offset, s.layout) for s in a.slices if s.param == "merge.weight"] == [(0, Layout(1, 4, 1))]
    assert [(s.offset, s.layout) for s in b.slices if s.param == "merge.weight"] == [(4, Layout(1, 6, 1))]
    # the gate and up halves of one projection: a unit is one channel in each half
    fused = groups["fused.weight"]
    assert not fused.blocked and fused.units == 6
    assert [s.layout for s in fused.slices if s.param == "fused.weight"] == [Layout(2, 6, 1)]


def test_fused_qkv_heads_are_cut_in_all_three_projections():
    _, groups = groups_of(SDPABlock(dim=16, heads=4), torch.randn(2, 5, 16))
    heads = groups["qkv.weight"]
    assert heads.kind == "heads" and heads.units == 4 and not heads.blocked
    assert [s.layout for s in heads.slices if s.param == "qkv.weight"] == [Layout(3, 4, 4)]
    assert [(a.node.target, a.position) for a in heads.shape_args] == [(torch.ops.aten.reshape.default, 3),
                                                                       (torch.ops.aten.reshape.default, 2)]


def test_grouped_query_attention_units_are_kv_heads_with_their_query_heads():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=8,
                         num_key_value_heads=2, intermediate_size=48, use_cache=False)
    graph, groups = groups_of(LlamaForCausalLM(config), torch.randint(0, 64, (2, 6)))
    heads = groups["model.layers.0.self_attn.q_proj.weight"]
    assert heads.kind == "heads" and heads.units == 2
    layouts = {s.param.split(".")[-2]: s.layout for s in heads.slices if s.dim == 0}
    assert layouts == {"q_proj": Layout(1, 2, 16), "k_proj": Layout(1, 2, 4), "v_proj": Layout(1, 2, 4)}
    # the repeat of kv heads before attention: its expand and reshape sizes count heads
    assert {a.node.target for a in heads.shape_args} == {torch.ops.aten.expand.default,
                                                         torch.ops.aten.reshape.default}
    gated = groups["model.layers.0.mlp.gate_proj.weight"]
    assert [p.args[1].target for p in gated.producers] == ["model.layers.0.mlp.gate_proj.weight",
                                                           "model.layers.0.mlp.up_proj.weight"]
    # the residual stream meets RMSNorm and the embedding table: left alone, with the node named
    assert groups["model.layers.0.mlp.down_proj.weight"].blocked
    analysis_ = DependencyAnalysis(graph)
    expected = 16 * 32 + 2 * (4 * 32) + 32 * 16  # q rows, k and v rows, o columns of one unit
    assert analysis_.removed_params({heads.name: 1}) == expected
    assert analysis.param_count(graph) > expected


def test_a_layer_applied_twice_is_left_alone_and_says_its_weight_is_shared():
    class Twice(nn.Module):  # one Linear used at two places (ALBERT shares a layer across depth this way)
        def __init__(self) -> None:
            super().__init__()
            self.shared, self.out = nn.Linear(16, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.out(torch.relu(self.shared(torch.relu(self.shared(x)))))

    graph = capture(Twice().eval(), (torch.randn(2, 16),))
    shared = [g for g in DependencyAnalysis(graph).groups if g.name == "shared.weight"]
    assert len(shared) == 2  # a group per use, neither cut
    for group in shared:
        assert group.blocked and "'shared.weight' is read by 2 ops" in group.blocked[0][1]


def test_an_unflatten_beside_the_channels_and_an_unbind_without_a_dim_are_followed():
    class Unflattened(nn.Module):  # channels in dim 1, the spatial dims flattened and unflattened again
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 3, padding=1)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)).flatten(2).unflatten(2, (8, 8)))

    class Unbound(nn.Module):  # k and v of a fused projection taken apart by unbind(0), its dim left out
        def __init__(self) -> None:
            super().__init__()
            self.kv, self.q, self.out = nn.Linear(16, 32), nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            b, n, _ = x.shape
            k, v = self.kv(x).view(b, n, 2, 4, 4).permute(2, 0, 3, 1, 4).unbind(0)
            q = self.q(x).view(b, n, 4, 4).transpose(1, 2)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return x + self.out(y.transpose(1, 2).reshape(b, n, 16))

    for model, example in ((Unflattened(), torch.randn(2, 3, 8, 8)), (Unbound(), torch.randn(2, 5, 16))):
        graph = capture(model.eval(), (example,))
        result = get_pass("prune.structured")(ratio=0.5, target="all").run(
            graph, PassContext(calibration=[(example,)], example_inputs=(example,), calibrated=False))
        assert result.changed, result.notes
        with torch.no_grad():
            assert graph(torch.cat([example, example])).shape[0] == 4


def test_an_in_place_dropout_passes_its_channels_on_and_a_grouped_conv_cuts_every_block_alike():
    """An in-place dropout (what torchvision's classifiers use) is an identity at inference, as the
    plain one; a depthwise conv passes its input's channels on (it is no producer), and a conv with
    4 groups of 2 channels reads and writes units of one position in each of its blocks."""
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2, inplace=True), nn.Linear(16, 4))
    _, groups = groups_of(mlp, torch.randn(2, 8))
    assert not groups["0.weight"].blocked and groups["0.weight"].units == 16
    convs = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 3, groups=4),
                          nn.Conv2d(8, 2, 1))
    _, groups = groups_of(convs, torch.randn(2, 3, 8, 8))
    assert sorted(groups) == ["0.weight", "2.weight", "3.weight"]
    for name in ("0.weight", "2.weight"):
        assert not groups[name].blocked and groups[name].units == 2 and groups[name].blocks == 4
    first = {(s.param, s.dim): s.layout for s in groups["0.weight"].slices}
    assert first[("0.weight", 0)] == first[("1.weight", 0)] == first[("1.bias", 0)] == Layout(4, 2, 1)
    assert first[("2.weight", 1)] == Layout(1, 2, 1)  # indexed within a block: each unit once
    assert [c.groups for c in groups["0.weight"].consumers] == [4]
    assert {(s.param, s.dim): s.layout for s in groups["2.weight"].slices}[("2.weight", 0)] == Layout(4, 2, 1)
    transposed = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ConvTranspose2d(8, 8, 3), nn.Conv2d(8, 2, 1))
    _, groups = groups_of(transposed, torch.randn(2, 3, 8, 8))
    assert groups["0.weight"].blocked and "conv_transpose2d" in groups["0.weight"].blocked[0][1]


def test_in_place_and_other_pointwise_activations_pass_channels_on_and_prelu_slopes_are_cut():
    """CSPDarknet and YOLO-style nets apply LeakyReLU in place (``aten.leaky_relu_``), which left every
    group of CSPDarknet-53 alone; a PReLU with a slope per channel has its slopes cut with them, one
    with a single slope has nothing to cut."""
    activations = [nn.LeakyReLU(0.1, inplace=True), nn.ELU(inplace=True), nn.SELU(inplace=True), nn.CELU(),
                   nn.Softplus(), nn.Mish(inplace=True), nn.Hardsigmoid(inplace=True), nn.Threshold(0.1, 0.0),
                   nn.LogSigmoid(), nn.Softshrink(), nn.Hardshrink(), nn.RReLU(), nn.PReLU(8), nn.PReLU()]
    layers = [nn.Conv2d(3, 8, 1)]
    for activation in activations:
        layers += [activation, nn.Conv2d(8, 8, 1)]
    model = nn.Sequential(*layers, nn.Conv2d(8, 2, 1))
    _, groups = groups_of(model, torch.randn(2, 3, 4, 4))
    free = [name for name, group in groups.items() if not group.blocked]
    assert len(free) == len(activations) + 1, {name: g.blocked for name, g in groups.items()}
    prelu = torch.ops.aten.prelu.default
    slopes = {s.param: s.role for g in groups.values() for s in g.slices if s.node.target == prelu}
    assert slopes == {"25.weight": "attached"}  # the single slope of '27' is shared by every channel


class TwoWaysToOneUnit(nn.Module):
    """Channels a conv with a depth multiplier reads (8 groups of 1: units must be whole across all 8
    groups) and a reshape splits into [2, 4] (units must be whole across the 4): no unit suits both."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.multiplier = nn.Conv2d(8, 16, 3, groups=8)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.a(x)
        halves = a.view(a.shape[0], 2, 4, *a.shape[2:]).mean(dim=1)
        return self.multiplier(a), self.c(self.b(x) * halves)


def test_a_group_asked_for_units_coarser_than_its_width_is_left_alone_at_once():
    """Coarsening such a group would go on sweep after sweep (it did, until the sweep limit: CPU time,
    and every group 'did not settle'); it is left alone, named, and the conv with the depth multiplier
    still makes a group of its own."""
    _, groups = groups_of(TwoWaysToOneUnit(), torch.randn(2, 3, 6, 6))
    assert groups["a.weight"].blocked[0][1] == "the ops its channels pass ask for units coarser than its layers' widths"
    assert not groups["multiplier.weight"].blocked or "output" in groups["multiplier.weight"].blocked[0][1]


def test_an_upsampled_branch_added_to_another_is_one_group_with_it():
    """HRNet fuses resolutions by upsampling one branch and adding it to another: the upsample treats
    each channel on its own, so both branches' convs are one group (HRNet-W18-small: 45 of 46 groups
    free, the upsamples left 21 of 63 alone)."""
    _, groups = groups_of(ResolutionFusionNet(), torch.randn(2, 1, 8, 8))
    fused = groups["low.0.weight"]  # named after its first producer in the graph
    assert not fused.blocked
    assert [p.args[1].target for p in fused.producers] == ["low.0.weight", "high.0.weight", "smooth.weight"]


class UnevenRuns(nn.Module):
    """A conv's 8 channels added to two convs' 3 and 5 side by side: no equal runs to cut them into."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(2, 3, 1), nn.Conv2d(2, 5, 1), nn.Conv2d(2, 8, 1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([self.a(x), self.b(x)], dim=1) + self.c(x))


def test_runs_of_different_lengths_meet_only_where_cut_into_equal_runs():
    _, groups = groups_of(UnevenRuns(), torch.randn(2, 2, 4, 4))
    for name in ("a.weight", "b.weight", "c.weight"):
        assert groups[name].blocked == [("add", "combines channel runs of different lengths")]


class CacheWrite(nn.Module):
    """Keys written into a cache input at given slots, as a decoder step writes its KV cache."""

    def __init__(self) -> None:
        super().__init__()
        self.key = nn.Linear(8, 6)
        self.out = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor, slots: torch.Tensor, cache: torch.Tensor):
        written = cache.index_copy(1, slots, self.key(x))  # [B, L, 6]: the new rows at ``slots``
        return self.out(written), written


def test_channels_written_into_an_input_cut_it_only_where_the_caller_allocates_it_from_the_graph():
    """A user's input keeps the size the user gives it: the group is left alone, named. An input
    allocated from the graph's shapes (a decoder's cache) is cut with the group, and the written
    tensor may then reach the outputs."""
    graph = capture(CacheWrite().eval(), (torch.randn(2, 3, 8), torch.tensor([0, 2, 4]), torch.zeros(2, 6, 6)))
    (kept,) = [g for g in DependencyAnalysis(graph).groups if g.name == "key.weight"]
    assert kept.blocked[0][1] == "writes the channels into the input 'cache', which the caller allocates at its " \
                                 "present size"
    (cut,) = [g for g in DependencyAnalysis(graph, resizable_inputs=frozenset({"cache"})).groups
              if g.name == "key.weight"]
    assert not cut.blocked and cut.units == 6
    assert {(s.param, s.dim, s.role) for s in cut.slices} >= {("cache", 2, "input"), ("out.weight", 1, "consumer")}
