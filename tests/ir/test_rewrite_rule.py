"""Pattern rewrites: matching traced patterns (ops, repeated arguments, literals, optional trailing
arguments), check guards, explanations of failed matches, traced replacements; and the layer rules
the weight passes find their layers with (tied, skipped and buffer weights)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bevel
from bevel.ir import capture
from bevel.ir.rewrite_rule import RULES, Match, RewriteRule, register_rule
from bevel.passes.quantize.sites import TIED, AddmmLinearLayer, EmbeddingTable, LinearLayer, find_sites

aten = torch.ops.aten


class LinearRelu(RewriteRule):
    """relu(linear(x, w, b)): two ops."""

    def pattern(self, x, w, b):
        return aten.relu.default(aten.linear.default(x, w, b))


class Double(RewriteRule):
    """x + x: one argument used twice."""

    def pattern(self, x):
        return aten.add.Tensor(x, x)


class TimesTwo(RewriteRule):
    """x * 2.0: a literal."""

    def pattern(self, x):
        return aten.mul.Tensor(x, 2.0)


class Net(nn.Module):
    """A linear+relu, a linear without bias and without relu, x + x, a + b, x * 2 and x * 3."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        g = self.b(h)
        return torch.relu(g + g) + (h + g) * 2.0 + h * 3.0


@pytest.fixture
def graph():
    torch.manual_seed(0)
    return capture(Net().eval(), (torch.randn(3, 8),))


def test_a_two_op_pattern_matches_where_both_ops_line_up_and_binds_its_arguments(graph):
    rule = LinearRelu()
    matches = rule.matches(graph)
    assert len(matches) == 1
    m = matches[0]
    assert m.node("w").target == "a.weight" and m.node("b").target == "a.bias" and m.node("x").op == "placeholder"
    assert torch.equal(m["w"], graph.param("a.weight")) and m.is_param("w")
    explained = {e.node: e for e in rule.explain(graph)}
    assert len(explained) == 2 and sum(e.matched for e in explained.values()) == 1  # two relus in the graph
    failed = next(e for e in explained.values() if not e.matched)
    assert failed.reason == "aten.linear expected, found 'add' (aten.add.Tensor)"


def test_an_optional_trailing_argument_left_out_binds_the_ops_default(graph):
    class AnyLinear(RewriteRule):
        def pattern(self, x, w, b):
            return aten.linear.default(x, w, b)

    bound = {m.node("w").target: m.node("b") for m in AnyLinear().matches(graph)}
    assert bound["b.weight"] is None and bound["a.weight"].target == "a.bias"

    class Lookup(RewriteRule):
        def pattern(self, w, ids, padding_idx):
            return aten.embedding.default(w, ids, padding_idx)

    table = capture(nn.Embedding(10, 4).eval(), (torch.randint(0, 10, (2, 3)),))
    (m,) = Lookup().matches(table)
    assert m.node("padding_idx") == -1  # the schema's default: the value the op runs with


def test_an_optional_argument_left_out_in_two_places_binds_the_same_default():
    class SharedBias(RewriteRule):
        def pattern(self, x, w1, w2, b):
            return aten.linear.default(aten.linear.default(x, w1, b), w2, b)

    graph = capture(nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)).eval(),
                    (torch.randn(3, 4),))
    (m,) = SharedBias().matches(graph)
    assert m.node("b") is None and m.node("w2").target == "1.weight"


def test_an_argument_used_twice_must_bind_the_same_node_twice(graph):
    explained = Double().explain(graph)
    assert [e.matched for e in explained] == [True, False, False, False]  # g + g; h + g; the two final sums
    assert explained[1].reason == ("argument x is 'relu' (aten.relu) in one place and 'linear_1' (aten.linear) "
                                   "in another")


def test_literals_must_be_equal(graph):
    explained = TimesTwo().explain(graph)
    assert [e.matched for e in explained] == [True, False]
    assert explained[1].reason == "argument 1 of 'mul_1' (aten.mul.Tensor): 2.0 expected, found 3.0"


class ClampToOne(RewriteRule):
    """clamp(x, v, v): an argument used twice that binds literals."""

    def pattern(self, x, v):
        return aten.clamp.default(x, v, v)


class Clamps(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, 0.5, 0.5) + torch.clamp(x, 1000, 1000) + torch.clamp(x, 0.5, 2.0)


def test_an_argument_used_twice_binds_equal_literals():
    graph = capture(Clamps(), (torch.randn(3, 4),))
    explained = ClampToOne().explain(graph)
    assert [e.matched for e in explained] == [True, True, False]
    assert explained[2].reason == "argument v is 0.5 in one place and 2.0 in another"


class SquareOfSin(RewriteRule):
    """sin(x) * sin(x) with one sin: an op the pattern uses twice."""

    def pattern(self, x):
        s = aten.sin.default(x)
        return aten.mul.Tensor(s, s)


class Sines(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sin(x)
        return s * s + torch.sin(x) * torch.sin(x)


def test_an_op_the_pattern_uses_twice_must_be_one_node_of_the_graph():
    graph = capture(Sines(), (torch.randn(3, 4),))
    explained = SquareOfSin().explain(graph)
    assert [e.matched for e in explained] == [True, False]
    assert explained[1].reason == ("the pattern's aten.sin is 'sin_1' (aten.sin) in one place and 'sin_2' (aten.sin) "
                                   "in another")


def test_check_refusals_are_explained_and_not_matched(graph):
    class OnlyBiased(LinearRelu):
        def check(self, m: Match) -> bool:
            return m.reject("no bias") if m.node("b") is None else m.reject("refused on purpose")

    assert OnlyBiased().matches(graph) == []
    assert [e.reason for e in OnlyBiased().explain(graph)][0] == "check refused: refused on purpose"


def test_rewrite_records_the_replacement_in_the_matched_node_place(graph):
    class HalfWeightTwiceInput(LinearRelu):
        """relu(linear(x, w, b)) as relu(linear(2 x, w / 2, b)): the same values, new ops and a new weight."""

        def rewrite(self, m, x, w, b):
            half = m.new_param("half_weight", m["w"].detach() / 2)
            return aten.relu.default(aten.linear.default(aten.mul.Tensor(x, 2.0), half, b))

    x = torch.randn(5, 8)
    before = graph(x)
    assert HalfWeightTwiceInput().apply(graph) == 1
    graph.refresh()
    torch.testing.assert_close(graph(x), before, rtol=1e-6, atol=1e-6)  # float rounding of the scaled product
    weights = {n.target for n in graph.nodes(op="get_attr")}
    assert "half_weight" in weights and "a.weight" not in weights  # the old weight is no longer read
    again = HalfWeightTwiceInput().matches(graph)  # the replacement has the pattern's form, on new nodes
    assert [(m.node("x").target, m.node("w").target) for m in again] == [(aten.mul.Tensor, "half_weight")]
    assert not graph.lint()


class TimesOne(RewriteRule):
    """x * 1.0 -> x: a rewrite that returns an input of the pattern."""

    def pattern(self, x):
        return aten.mul.Tensor(x, 1.0)

    def rewrite(self, m: Match, x):
        return x


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * 1.0


def test_a_node_the_rewrite_returns_unchanged_keeps_its_own_place_in_the_modules():
    graph = capture(Scaled().eval(), (torch.randn(3, 4),))
    linear = next(graph.nodes(target=aten.linear.default))
    stack = dict(linear.meta["nn_module_stack"])
    assert TimesOne().apply(graph) == 1
    assert linear.meta["nn_module_stack"] == stack and any("inner" in key for key in stack)
    assert graph.fx_graph.output_node().args[0] in (linear, (linear,))


def test_chained_matches_are_rewritten_one_after_another():
    class TimesTwoAsAdd(TimesTwo):
        def rewrite(self, m, x):
            return aten.add.Tensor(x, x)

    class Quadruple(nn.Module):
        def forward(self, x):
            return (x * 2.0) * 2.0

    graph = capture(Quadruple(), (torch.randn(3, 4),))
    assert TimesTwoAsAdd().apply(graph) == 2  # the second binds the first one's replacement
    graph.refresh()
    assert [n.target for n in graph.nodes(op="call_function")] == [aten.add.Tensor, aten.add.Tensor]
    x = torch.randn(2, 4)
    torch.testing.assert_close(graph(x), x * 4, rtol=0, atol=0)


def test_a_rule_without_rewrite_says_so(graph):
    with pytest.raises(NotImplementedError, match="defines no rewrite"):
        LinearRelu().apply(graph)


def test_a_pattern_must_end_in_an_op_and_registered_rules_need_a_name():
    class Identity(RewriteRule):
        def pattern(self, x):
            return x

    with pytest.raises(TypeError, match="must return the result of an op call"):
        Identity().pattern_graph()
    with pytest.raises(ValueError, match="needs a name of its own"):
        register_rule(LinearRelu)
    assert RULES["linear"] is LinearLayer and RULES["embedding"] is EmbeddingTable
    assert RULES["linear.addmm"] is AddmmLinearLayer


class Tied(nn.Module):
    """A tied embedding and output layer, a buffer used as a weight, and a plain Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.proj = nn.Linear(8, 8)
        self.register_buffer("fixed", torch.randn(8, 8))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.embed(ids))
        h = nn.functional.linear(h, self.fixed)
        return nn.functional.linear(h, self.embed.weight)


def test_layer_rules_refuse_tied_skipped_and_stored_buffer_weights():
    graph = capture(Tied().eval(), (torch.randint(0, 10, (2, 5)),))
    reasons = [e.reason for e in LinearLayer.for_graph(graph).explain(graph)]
    assert reasons[0] == "matched"
    assert reasons[1] == "check refused: w is 'fixed' (get_attr), not a stored weight"
    assert reasons[2] == f"check refused: {TIED}"
    assert [e.reason for e in EmbeddingTable.for_graph(graph).explain(graph)] == [f"check refused: {TIED}"]
    skipping = LinearLayer(skip=("proj.*",), readers={})
    assert skipping.explain(graph)[0].reason == "check refused: proj.weight matches a skip pattern"
    sites, notes = find_sites(graph, skip=(), embeddings=True)
    assert [s.weight_name for s in sites] == ["proj.weight"]
    assert notes == [f"embed.weight left in float: {TIED}"]  # once, for both reads of the tied table


class ReadInAList(nn.Module):
    """q's weight is read by its Linear and, inside a list, by a cat that feeds another matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(4, 4)
        self.k = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q(x), nn.functional.linear(x, torch.cat([self.q.weight, self.k.weight]))


def test_a_weight_also_read_inside_a_list_is_tied():
    graph = capture(ReadInAList().eval(), (torch.randn(3, 4),))
    sites, notes = find_sites(graph, skip=(), embeddings=False)
    assert sites == [] and notes == [f"q.weight left in float: {TIED}"]


class CalledTwice(nn.Module):
    """One Linear applied twice (weights shared across depth, as ALBERT shares its layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(torch.relu(self.shared(x)))


@pytest.mark.parametrize("pipeline, left", [("quantize.int8_weight", "left in float"), ("prune.nm", "left dense"),
                                            ("lowrank(param_ratio=0.5)", "left as it is")])
def test_a_layer_called_twice_is_named_in_the_words_of_the_pass(pipeline, left):
    x = torch.randn(16, 8)
    entry = bevel.compile(CalledTwice().eval(), pipeline, example_inputs=(x,)).report.passes[0]
    assert entry.status == "no change"
    assert f"shared.weight {left}: its weight is read by more than one op (a tied weight, or a layer called more " \
           f"than once)" in entry.notes
