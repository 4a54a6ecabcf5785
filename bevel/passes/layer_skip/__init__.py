"""Layer skipping: removing whole transformer blocks that change the hidden state least (``static``), and
leaving the model early where its own head is already confident (``early_exit``)."""

from bevel.passes.layer_skip import early_exit, static  # noqa: F401
