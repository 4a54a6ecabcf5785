"""Codegen: the lowering that prepares a rewritten graph for its target device, and (later) Triton kernels."""

from bevel.codegen.lower import lower

__all__ = ["lower"]
