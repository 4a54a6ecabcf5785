"""What the attention passes share: the kernel tile parameter and its check."""

from __future__ import annotations

from bevel.errors import ParamError
from bevel.passes.base import param

BLOCK_HELP = "tile of the block-sparse attention kernel and of its block table, in tokens (a power of two >= 16)"


def block_param() -> int:
    """The ``block`` parameter every attention pass takes."""
    return param(64, BLOCK_HELP, ge=16)


def check_block(pass_name: str, block: int) -> None:
    """A ParamError unless ``block`` is a power of two (the kernel's tile sizes are)."""
    if block & (block - 1):
        raise ParamError(f"{pass_name}(block={block}): the block must be a power of two (16, 32, 64, 128, ...)",
                         key="block")
