"""Patch convolutions as matrix products, applied when a graph is lowered for CUDA.

A 2-D convolution whose kernel equals its stride, without padding, dilation or groups (a ViT's
patch embedding, a ConvNeXt stem), reads every input pixel once: it is the image cut into patches
and one matrix product with the flattened kernel. On an H200, cuDNN took 0.7 ms for ViT-B/16's
patch embedding at batch 64 in bfloat16 (the largest single op after the matrix products of a
token-merged ViT), where the same product, [12544, 768] by [768, 768], is 15 GFLOP, which that
GPU's peak rate would do in tens of microseconds (an estimate: the rewrite is not yet timed there).
Only convolutions over a static image size are rewritten.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from bevel.ir.arguments import argument
from bevel.ir.graph import Graph

aten = torch.ops.aten


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value) * (2 // len(value))


def _patch_size(graph: Graph, node: fx.Node) -> tuple[int, int] | None:
    """The kernel size of a patch convolution ``node`` (aten.conv2d or aten.convolution), or None if
    it is not one."""
    x, weight = node.args[0], node.args[1]
    padding = argument(node, "padding", 0)
    if (argument(node, "transposed", False) or argument(node, "groups", 1) != 1 or isinstance(padding, str)
            or not graph.is_tensor_attr(weight)):
        return None
    shape = graph.shape(x)
    if shape is None or len(shape) != 4 or not all(is_concrete_int(d) for d in shape[1:]):
        return None
    kernel = tuple(graph.param(weight.target).shape[2:])
    if (_pair(argument(node, "stride", 1)) != kernel or _pair(padding) != (0, 0)
            or _pair(argument(node, "dilation", 1)) != (1, 1)):
        return None
    return kernel


def patch_convs_as_matmuls(graph: Graph) -> int:
    """Rewrite every patch convolution of ``graph`` (see the module docstring) as reshape, permute and
    ``linear``; returns how many. The caller refreshes the graph."""
    count = 0
    for node in graph.nodes(op="call_function", target=(aten.conv2d.default, aten.convolution.default)):
        kernel = _patch_size(graph, node)
        if kernel is None:
            continue
        x, weight, bias = node.args[0], node.args[1], argument(node, "bias", None)
        _, channels, height, width = (int(d) if i else d for i, d in enumerate(graph.shape(x)))
        rows, cols = height // kernel[0], width // kernel[1]
        kernel_weight = graph.param(weight.target)
        matrix = graph.add_param(f"{weight.target.replace('.', '_')}_as_matrix",
                                 kernel_weight.reshape(kernel_weight.shape[0], -1).contiguous(), before=node,
                                 as_parameter=isinstance(kernel_weight, torch.nn.Parameter))
        with graph.fx_graph.inserting_before(node):
            if rows * kernel[0] != height or cols * kernel[1] != width:  # the convolution drops the rest
                x = graph.fx_graph.call_function(aten.slice.Tensor, (x, 2, 0, rows * kernel[0]))
                x = graph.fx_graph.call_function(aten.slice.Tensor, (x, 3, 0, cols * kernel[1]))
            patches = graph.fx_graph.call_function(aten.reshape.default,
                                                   (x, [-1, channels, rows, kernel[0], cols, kernel[1]]))
            # [B, rows, cols, C, kh, kw]: each patch flattened in the kernel's (C, kh, kw) order
            patches = graph.fx_graph.call_function(aten.permute.default, (patches, [0, 2, 4, 1, 3, 5]))
            # one row per patch: a 2-D product (torch 2.11's linear cannot take a 4-D input of symbolic batch
            # through fake tensors: its folding asks for a concrete element count)
            patches = graph.fx_graph.call_function(aten.reshape.default,
                                                   (patches, [-1, channels * kernel[0] * kernel[1]]))
            out = graph.fx_graph.call_function(aten.linear.default, (patches, matrix, bias))
            out = graph.fx_graph.call_function(aten.reshape.default, (out, [-1, rows, cols, kernel_weight.shape[0]]))
            out = graph.fx_graph.call_function(aten.permute.default, (out, [0, 3, 1, 2]))
        graph.replace_node(node, out)
        count += 1
    return count
