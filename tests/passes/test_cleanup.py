"""cleanup: exact on random inputs (a hypothesis property over random models), and on real MiniLM.

Tolerance: cleanup only removes ops that return their input and evaluates constant subgraphs with
the same kernels, so outputs should be bit-identical; the check allows 1e-5, the bound cleanup
promises, which still catches any real change (a dropped op moves outputs by far more).
"""

from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st
from torch import nn
import torch.nn.functional as F

from bevel.compiler.captured import copy_model
from bevel.ir import capture
from bevel.passes import PassContext, get_pass
from tests.models_zoo import AttentionBlock, ConvNet, MLP, SDPABlock

aten = torch.ops.aten
TOLERANCE = 1e-5


def run_cleanup(model, example):
    graph = capture(model, example)
    result = get_pass("cleanup")().run(graph, PassContext(calibration=[example], example_inputs=example))
    assert graph.lint() == []
    return graph, result


class Noisy(nn.Module):
    """A random mix of layers and no-op ops (identity reshapes, *1, +0, clone, casts to the same dtype)."""

    def __init__(self, ops: list[str], width: int) -> None:
        super().__init__()
        self.ops = ops
        self.linears = nn.ModuleList(nn.Linear(width, width) for _ in ops)
        self.drop = nn.Dropout(0.3)
        self.register_buffer("table", torch.linspace(-1, 1, width))

    def forward(self, x):
        for op, linear in zip(self.ops, self.linears):
            if op == "linear":
                x = linear(x)
            elif op == "dropout":
                x = self.drop(x)
            elif op == "reshape":
                x = x.reshape(x.shape[0], -1).view(x.shape)
            elif op == "scalar":
                x = (x * 1 + 0) / 1 - 0
            elif op == "clone":
                x = x.clone().contiguous().detach()
            elif op == "cast":
                x = x.to(torch.float32).type_as(x)
            elif op == "buffer":
                x = x + torch.tanh(self.table * 2).unsqueeze(0)  # constant subgraph: folded
            elif op == "act":
                x = F.silu(x)
            elif op == "slice":
                x = x[:, :]
        return x


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["noisy", "mlp", "conv", "attention", "sdpa"]),
       ops=st.lists(st.sampled_from(["linear", "dropout", "reshape", "scalar", "clone", "cast", "buffer", "act",
                                     "slice"]), min_size=1, max_size=6),
       width=st.integers(2, 12), batch=st.integers(2, 4), seed=st.integers(0, 2**16))
def test_cleanup_never_changes_outputs(kind, ops, width, batch, seed):
    torch.manual_seed(seed)
    if kind == "noisy":
        model, example = Noisy(ops, width), (torch.randn(batch, width),)
        fresh = (torch.randn(batch + 3, width),)
    elif kind == "mlp":
        model, example = MLP((width, 2 * width, width)), (torch.randn(batch, width),)
        fresh = (torch.randn(batch + 3, width),)
    elif kind == "conv":
        model, example = ConvNet(channels=width % 4 + 2), (torch.randn(batch, 3, 8, 8),)
        fresh = (torch.randn(batch + 1, 3, 9, 9),)
    elif kind == "attention":
        model, example = AttentionBlock(dim=8, heads=2), (torch.randn(batch, 5, 8),)
        fresh = (torch.randn(batch + 1, 7, 8),)
    else:
        model, example = SDPABlock(dim=8, heads=2), (torch.randn(batch, 5, 8),)
        fresh = (torch.randn(batch + 1, 7, 8),)
    model.eval()
    graph, _ = run_cleanup(model, example)
    with torch.no_grad():
        expected, actual = model(*fresh), graph(*fresh)
    assert (expected - actual).abs().max() <= TOLERANCE


def test_cleanup_removes_dropout_identities_and_folds_constants():
    model = Noisy(["linear", "dropout", "reshape", "scalar", "clone", "buffer"], 6).eval()
    graph, result = run_cleanup(model, (torch.randn(3, 6),))
    targets = {node.target for node in graph.nodes(op="call_function")}
    assert aten.dropout.default not in targets
    assert not targets & {aten.mul.Tensor, aten.div.Tensor, aten.sub.Tensor, aten.clone.default,
                          aten.view.default, aten.reshape.default, aten.tanh.default}
    assert result.stats["dropout_removed"] == 1
    assert result.stats["constants_folded"] >= 2  # table * 2, tanh (and the unsqueeze)
    assert "table" not in graph.tensors()  # the folded buffer's source is gone
    x = torch.randn(5, 6)
    assert torch.equal(graph(x), model(x))


def test_cleanup_keeps_weights_used_elsewhere_unfolded():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return x @ self.w.t() + x @ self.w  # w.t() alone would fold into a second copy of w

    model = Shared().eval()
    graph, _ = run_cleanup(model, (torch.randn(2, 4),))
    assert list(graph.tensors()) == ["w"]
    x = torch.randn(3, 4)
    assert torch.equal(graph(x), model(x))


def test_cleanup_on_minilm_is_exact(minilm, minilm_inputs, fresh_sentences):
    graph, result = run_cleanup(copy_model(minilm), minilm_inputs)  # a captured graph shares the model's weights
    assert result.stats["dropout_removed"] == 13  # embeddings + 2 per layer x 6
    with torch.no_grad():
        expected, actual = minilm(*fresh_sentences), graph(*fresh_sentences)
    for name in ("last_hidden_state", "pooler_output"):
        assert (expected[name] - actual[name]).abs().max() <= TOLERANCE


class MutatesACopy(nn.Module):
    def forward(self, x):
        y = x.clone()
        y.view(-1).add_(1)  # writes into the copy: the clone is not redundant
        z = x.to(torch.float32, copy=True)
        z.mul_(2)
        return x * 2 + y + z


def test_copies_that_are_written_into_are_kept_and_the_input_is_not_mutated():
    model = MutatesACopy().eval()
    graph, result = run_cleanup(model, (torch.randn(2, 3),))
    x = torch.randn(4, 3)
    before = x.clone()
    assert torch.equal(graph(x), model(before.clone()))
    assert torch.equal(x, before)  # the caller's tensor is untouched


class ReturnsCopies(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return x.clone(), self.w * 1


def test_returned_copies_are_kept_so_outputs_never_alias_inputs_or_weights():
    model = ReturnsCopies().eval()
    graph, _ = run_cleanup(model, (torch.randn(2, 3),))
    x = torch.randn(2, 3)
    out, weight = graph(x)
    assert out.data_ptr() != x.data_ptr()
    assert weight.data_ptr() != graph.param("w").data_ptr()


def test_folded_constants_keep_the_name_of_their_source():
    model = Noisy(["buffer"], 4).eval()
    graph, _ = run_cleanup(model, (torch.randn(2, 4),))
    assert any(name.startswith("table_folded") for name in graph.tensors()), list(graph.tensors())


class SizeMask(nn.Module):
    """Attention with a boolean mask built from ``arange``: all true (HF's ViT builds one), a band of
    ``window`` keys around each query (``"batch"``: as wide as 3 times the batch size), over a fixed
    count of tokens or the input's own; or (``window="rows"``) true only for the first two rows."""

    def __init__(self, window: int | str | None, tokens: int | None) -> None:
        super().__init__()
        self.window, self.tokens = window, tokens
        self.qkv = nn.Linear(16, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        count = n if self.tokens is None else self.tokens
        positions = torch.arange(count)
        distance = (positions[:, None] - positions[None, :]).abs()
        if self.window == "rows":
            mask = torch.arange(b)[:, None, None, None] < 2
        else:
            window = 3 * b if self.window == "batch" else self.window
            mask = (distance >= 0) if window is None else (distance <= window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.expand(b, 1, count, count))


def test_an_attention_mask_that_masks_nothing_is_dropped_and_others_are_kept():
    torch.manual_seed(0)
    example, fresh = torch.randn(2, 6, 16), torch.randn(3, 6, 16)
    for window, expected in ((None, 1), (2, 0), (8, 1)):  # all true; a band; a band wider than the tokens
        model = SizeMask(window, tokens=6).eval()
        graph, result = run_cleanup(model, (example,))
        assert result.stats["masks_dropped"] == expected, window
        (attention,) = graph.nodes(target=aten.scaled_dot_product_attention.default)
        assert (len(attention.args) < 4 or attention.args[3] is None) == bool(expected)
        with torch.no_grad():
            assert (graph(fresh) - model(fresh)).abs().max() <= TOLERANCE
    # masks all true at the example whose values depend on a size: over the input's own token count a
    # band wider than the example's tokens masks longer inputs; a band as wide as 3 x batch masks at
    # batch 1; a mask of the first two rows masks the third
    for window, tokens, fresh in ((8, None, torch.randn(2, 12, 16)), ("batch", 6, torch.randn(1, 6, 16)),
                                  ("rows", 6, torch.randn(5, 6, 16))):
        model = SizeMask(window, tokens).eval()
        graph, result = run_cleanup(model, (example,))
        assert result.stats["masks_dropped"] == 0, window
        with torch.no_grad():
            assert (graph(fresh) - model(fresh)).abs().max() <= TOLERANCE


class Conv1DLayers(nn.Module):
    """HF Conv1D layers as GPT-2 writes them (``addmm(b, x.view(-1, K), W)`` with W stored [K, N], viewed
    back), one on a 2-D input, and two that stay products: a scaled one and one whose weight is read again."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 16) * 0.1)
        self.bias = nn.Parameter(torch.randn(16) * 0.1)
        self.flat_weight = nn.Parameter(torch.randn(16, 8) * 0.1)
        self.flat_bias = nn.Parameter(torch.randn(8) * 0.1)
        self.scaled_weight = nn.Parameter(torch.randn(8, 8) * 0.1)
        self.scaled_bias = nn.Parameter(torch.randn(8) * 0.1)
        self.tied_weight = nn.Parameter(torch.randn(8, 8) * 0.1)
        self.tied_bias = nn.Parameter(torch.randn(8) * 0.1)

    def forward(self, x):
        rows = x.shape[:-1]
        h = torch.addmm(self.bias, x.view(-1, 8), self.weight).view(*rows, 16)  # GPT-2's Conv1D
        flat = torch.addmm(self.flat_bias, h.view(-1, 16), self.flat_weight)  # a 2-D product, kept 2-D
        scaled = torch.addmm(self.scaled_bias, flat, self.scaled_weight, alpha=0.5)
        tied = torch.addmm(self.tied_bias, scaled, self.tied_weight) + self.tied_weight.sum()
        return tied.view(*rows, 8)


def test_conv1d_layers_become_linear_layers_with_the_same_outputs():
    model = Conv1DLayers().eval()
    graph, result = run_cleanup(model, (torch.randn(2, 5, 8),))
    assert result.stats["linears_from_addmm"] == 2
    linears = [n for n in graph.nodes(target=aten.linear.default)]
    assert [n.args[1].target for n in linears] == ["weight", "flat_weight"]
    assert graph.param("weight").shape == (16, 8) and graph.param("flat_weight").shape == (8, 16)
    assert sorted(n.args[2].target for n in graph.nodes(target=aten.addmm.default)) == ["scaled_weight", "tied_weight"]
    x = torch.randn(3, 7, 8)
    with torch.no_grad():
        assert (graph(x) - model(x)).abs().max() <= TOLERANCE  # the same products, summed in another order



class MatmulLayers(nn.Module):
    """Linear layers multiplied by hand in every spelling of the transpose (``x @ W.T + b`` as Falcon's
    FalconLinear, ``W.t()``, ``W.mT``, ``W.transpose``, ``W.permute``, ``torch.mm``, a weight stored
    [K, N] with its bias added first), and products that stay products or keep their add: by a buffer,
    by a weight read twice, a product read twice, a bias of another dtype."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)

        def weight(*shape, dtype=torch.float32):
            return nn.Parameter((torch.randn(*shape, generator=g) * 0.3).to(dtype))

        self.numpy_t, self.numpy_t_bias = weight(12, 8), weight(12)
        self.t, self.mt, self.transposed, self.permuted = weight(12, 12), weight(10, 12), weight(12, 10), weight(8, 12)
        self.stored_kn, self.stored_kn_bias = weight(8, 12), weight(12)
        self.mm = weight(12, 12)
        self.register_buffer("rotation", torch.randn(12, 12, generator=g))
        self.tied = weight(12, 12)
        self.reused, self.reused_bias = weight(12, 12), weight(12)
        self.wide, self.wide_bias = weight(12, 12), weight(12, dtype=torch.float64)

    def forward(self, x):
        h = x @ self.numpy_t.T + self.numpy_t_bias
        h = torch.relu(h @ self.t.t())
        h = h @ self.mt.mT
        h = h @ self.transposed.transpose(1, 0)
        h = h @ self.permuted.permute(1, 0)
        h = self.stored_kn_bias + h @ self.stored_kn
        h = torch.mm(h.reshape(-1, 12), self.mm.transpose(-1, -2)).reshape(h.shape)
        h = h @ self.rotation  # a buffer: no layer
        h = h @ self.tied.T + self.tied.sum()  # the weight is read twice: no layer of its own
        reused = h @ self.reused.T
        h = reused + self.reused_bias + reused  # the product is read twice: its bias add stays
        return (h @ self.wide.T + self.wide_bias).float()  # the add promotes to float64: it stays


def test_matmul_layers_become_linear_layers_with_the_same_outputs():
    model = MatmulLayers().eval()
    graph, result = run_cleanup(model, (torch.randn(2, 5, 8),))
    assert result.stats["linears_from_matmul"] == 9
    linears = {n.args[1].target: n.args[2:] for n in graph.nodes(target=aten.linear.default)}
    assert set(linears) == {"numpy_t", "t", "mt", "transposed", "permuted", "stored_kn", "mm", "reused", "wide"}
    with_bias = {name: bias[0].target for name, bias in linears.items() if bias and bias[0] is not None}
    assert with_bias == {"numpy_t": "numpy_t_bias", "stored_kn": "stored_kn_bias"}
    assert graph.param("stored_kn").shape == (12, 8)  # stored [K, N]: now [N, K], as a Linear stores it
    assert graph.param("numpy_t").shape == (12, 8) and graph.param("transposed").shape == (12, 10)
    products = list(graph.nodes(target=(aten.matmul.default, aten.mm.default)))
    right = [n.args[1] if n.args[1].op == "get_attr" else n.args[1].args[0] for n in products]  # W or W.T
    assert sorted(r.target for r in right) == ["rotation", "tied"]
    x = torch.randn(3, 7, 8)
    with torch.no_grad():
        assert (graph(x) - model(x)).abs().max() <= TOLERANCE  # the same products, summed in another order
