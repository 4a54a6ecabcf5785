"""Quality measures for language models: perplexity on held-out text (by prefill windows, or through a
compiled decoder's decode loop) and a long-context needle check."""

from bevel.eval.decode import decode_perplexity
from bevel.eval.needle import needle_check
from bevel.eval.perplexity import perplexity

__all__ = ["decode_perplexity", "needle_check", "perplexity"]
