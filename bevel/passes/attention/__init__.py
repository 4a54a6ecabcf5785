"""Sparse attention passes for decoder step graphs: ``attention.window`` (sliding window with sinks),
``attention.heads`` (streaming and retrieval heads by calibration) and ``attention.block_sparse``
(estimated key blocks). Each rewrites the attention sites into ``bevel::sparse_attention``."""

from bevel.passes.attention import block_sparse, heads, window  # noqa: F401  (registers the passes)
