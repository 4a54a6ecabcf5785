"""Quality measures for language models: perplexity on held-out text and a long-context needle check."""

from bevel.eval.needle import needle_check
from bevel.eval.perplexity import perplexity

__all__ = ["needle_check", "perplexity"]
