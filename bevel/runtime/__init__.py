"""The runtime: custom ops, the CompiledModule users call, and artifacts (save/load)."""

from bevel.runtime.compiled_module import CompiledModule

__all__ = ["CompiledModule"]
