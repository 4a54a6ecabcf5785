"""Analyses: FLOPs per node checked against hand counts, parameter count and bytes, sparsity."""

from __future__ import annotations

import torch
from torch import nn

from bevel.ir import analysis, capture
from tests.models_zoo import ConvNet, MLP, SDPABlock


def _flops_by_target(graph):
    counts = {}
    for node in graph.nodes(op="call_function"):
        flops = analysis.node_flops(node)
        if flops:
            key = str(node.target)
            counts[key] = counts.get(key, 0) + flops
    return counts


def test_linear_flops_match_hand_count():
    graph = capture(MLP((16, 32, 8)).eval(), (torch.randn(3, 16),))
    # two linears at batch 3: 2*3*16*32 + 2*3*32*8 multiply-adds counted as two ops each
    assert analysis.total_flops(graph) == 2 * 3 * 16 * 32 + 2 * 3 * 32 * 8


def test_conv_flops_match_hand_count():
    graph = capture(ConvNet(channels=4, classes=5).eval(), (torch.randn(2, 3, 8, 8),))
    conv1 = 2 * (2 * 4 * 8 * 8) * (3 * 3 * 3)       # output elements x (in_ch * k * k)
    conv2 = 2 * (2 * 8 * 3 * 3) * (4 * 3 * 3)       # stride 2, no padding: 8x8 -> 3x3
    head = 2 * 2 * 8 * 5
    assert analysis.total_flops(graph) == conv1 + conv2 + head


def test_attention_and_matmul_flops():
    graph = capture(SDPABlock(dim=16, heads=4).eval(), (torch.randn(2, 6, 16),))
    by_target = _flops_by_target(graph)
    # q.k^T and p.v: 2 * B*H * L*S * (E + Ev), E = Ev = 16/4
    assert by_target["aten.scaled_dot_product_attention.default"] == 2 * 2 * 4 * 6 * 6 * (4 + 4)

    class Matmul(nn.Module):
        def forward(self, a, b):
            return torch.matmul(a, b) + torch.bmm(a, b)

    graph = capture(Matmul(), (torch.randn(2, 3, 4), torch.randn(2, 4, 5)))
    assert analysis.total_flops(graph) == 2 * (2 * 2 * 3 * 4 * 5)


def test_param_count_bytes_and_sparsity():
    model = MLP((16, 32, 8)).eval()
    graph = capture(model, (torch.randn(3, 16),))
    numel = sum(p.numel() for p in model.parameters())
    assert analysis.param_count(graph) == numel
    assert analysis.param_bytes(graph) == 4 * numel
    assert analysis.weight_sparsity(graph) == 0.0
    weight = graph.param("layers.0.weight").clone()
    weight[:8] = 0  # 8 of 32 rows
    graph.set_param("layers.0.weight", weight)
    assert analysis.weight_sparsity(graph) == (8 * 16) / (16 * 32 + 32 * 8)
    assert set(analysis.layer_weights(graph)) == {"layers.0.weight", "layers.1.weight"}


def test_matmul_style_linears_count_as_layers_but_activation_matmuls_do_not():
    class Conv1DStyle(nn.Module):
        """GPT-2's Conv1D: addmm(bias, x, W) with W of shape [in, out]."""

        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 4))
            self.bias = nn.Parameter(torch.zeros(4))
            self.scale = nn.Parameter(torch.ones(4))  # a 1-D parameter in a matmul is not a weight matrix

        def forward(self, x):
            y = torch.addmm(self.bias, x.view(-1, 8), self.weight)
            return (y @ y.t()) @ y * self.scale + torch.matmul(y, self.scale).unsqueeze(-1)

    graph = capture(Conv1DStyle().eval(), (torch.randn(3, 8),))
    assert set(analysis.layer_weights(graph)) == {"weight"}
