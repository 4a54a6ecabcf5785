"""Graph rewriting passes, one module (or small package) per technique family, and their registry."""

from bevel.passes.base import Pass, PassContext, PassParams, PassResult, param
from bevel.passes.registry import available_passes, get_pass, register_pass

# Importing the built-in passes registers them.
from bevel.passes import attention  # noqa: E402,F401
from bevel.passes import cleanup  # noqa: E402,F401
from bevel.passes import fuse_attention  # noqa: E402,F401
from bevel.passes import kv  # noqa: E402,F401
from bevel.passes import layer_skip  # noqa: E402,F401
from bevel.passes import lowrank  # noqa: E402,F401
from bevel.passes import prune  # noqa: E402,F401
from bevel.passes import quantize  # noqa: E402,F401
from bevel.passes import tome  # noqa: E402,F401

__all__ = ["Pass", "PassContext", "PassParams", "PassResult", "available_passes", "get_pass", "param",
           "register_pass"]
