"""Token reducing passes for transformer encoders: token merging (``tome``, ``tome.pitome``), token
pruning (``token_prune``) and sequence packing of padded batches (``unpad``), sharing the block
recognition and the graph rewrite."""

from bevel.passes.tome import merge  # noqa: F401
from bevel.passes.tome import pitome  # noqa: F401
from bevel.passes.tome import token_prune  # noqa: F401
from bevel.passes.tome import unpad  # noqa: F401
