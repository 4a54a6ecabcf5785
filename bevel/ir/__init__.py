"""The graph bevel rewrites: capture from torch.export, node metadata, analyses and the ONNX bridge."""

from bevel.ir.capture import capture
from bevel.ir.graph import Graph

__all__ = ["Graph", "capture"]
