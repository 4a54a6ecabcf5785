"""Token reducing passes for transformer encoders: token merging (``tome``)."""

from bevel.passes.tome import merge  # noqa: F401
