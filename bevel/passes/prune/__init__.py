"""Pruning passes: weights set to zero or removed."""

from bevel.passes.prune import magnitude  # noqa: F401  (registers prune.magnitude)
from bevel.passes.prune import nm  # noqa: F401  (registers prune.nm)
from bevel.passes.prune import structured  # noqa: F401  (registers prune.structured)
