"""Patch convolutions as matrix products (``codegen/patch_conv.py``, applied when lowering for CUDA),
checked on the CPU: the rewritten graph against the captured one on fresh inputs, and which
convolutions are left alone.

Each output is a sum of C * kh * kw (at most 192 here) products of O(1) float32 values in another
order than the convolution's: differences of a few ulps of the sums, far below 1e-5.
"""

from __future__ import annotations

import torch
from torch import nn

from bevel.codegen.patch_conv import patch_convs_as_matmuls
from bevel.ir import capture
from tests.models_zoo import seeded

aten = torch.ops.aten


class Convolutions(nn.Module):
    """Four patch convolutions (square, rectangular without bias, one leaving a remainder of the
    image, one written as aten.convolution, as other exports give it) and three that are not
    (padded, overlapping, grouped)."""

    def __init__(self) -> None:
        super().__init__()
        self.square = nn.Conv2d(3, 8, 4, stride=4)
        self.rectangular = nn.Conv2d(3, 8, (4, 2), stride=(4, 2), bias=False)
        self.remainder = nn.Conv2d(3, 8, 7, stride=7)  # 30 = 4 * 7 + 2: the last 2 rows and columns unread
        self.padded = nn.Conv2d(3, 8, 4, stride=4, padding=1)
        self.overlapping = nn.Conv2d(3, 8, 4, stride=2)
        self.grouped = nn.Conv2d(4, 8, 4, stride=4, groups=2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        general = aten.convolution.default(x, self.square.weight, self.square.bias, [4, 4], [0, 0], [1, 1], False,
                                           [0, 0], 1)
        return (self.square(x), self.rectangular(x), self.remainder(x), general, self.padded(x), self.overlapping(x),
                self.grouped(torch.cat([x, x[:, :1]], dim=1)))


def test_patch_convolutions_become_matrix_products_with_the_same_outputs():
    torch.manual_seed(0)
    model = Convolutions().eval()
    example = (torch.randn(2, 3, 30, 30, generator=seeded(0)),)
    assert patch_convs_as_matmuls(capture(model, example)) == 0  # a symbolic image size is left alone
    graph = capture(model, example, dynamic_shapes=({0: torch.export.Dim("batch")},))  # the image size fixed
    assert patch_convs_as_matmuls(graph) == 4
    graph.refresh()
    assert len(list(graph.nodes(op="call_function", target=aten.conv2d.default))) == 3  # the other three
    assert not list(graph.nodes(op="call_function", target=aten.convolution.default))
    assert len(list(graph.nodes(op="call_function", target=aten.linear.default))) == 4
    fresh = torch.randn(5, 3, 30, 30, generator=seeded(1))  # another batch size: the batch stays dynamic
    with torch.no_grad():
        for got, want in zip(graph(fresh), model(fresh)):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_vit_patch_embedding_becomes_a_matrix_product():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                              num_classes=5).eval()
    graph = capture(model, (torch.randn(2, 3, 32, 32, generator=seeded(0)),))
    assert patch_convs_as_matmuls(graph) == 1
    graph.refresh()
    assert not list(graph.nodes(op="call_function", target=aten.conv2d.default))
    assert "patch_embed.proj.weight" not in graph.tensors()  # the kernel is kept once, as a matrix
    fresh = torch.randn(3, 3, 32, 32, generator=seeded(1))
    with torch.no_grad():
        torch.testing.assert_close(graph(fresh), model(fresh), rtol=1e-5, atol=1e-5)
