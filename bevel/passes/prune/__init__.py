"""Pruning passes: weights set to zero or removed."""

from bevel.passes.prune import magnitude  # noqa: F401  (registers prune.magnitude)
