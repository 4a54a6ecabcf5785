"""Layer skipping: removing whole transformer blocks that change the hidden state least."""

from bevel.passes.layer_skip import static  # noqa: F401
