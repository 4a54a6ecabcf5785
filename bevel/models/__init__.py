"""Built-in models, by the names the CLI accepts for MODEL."""

BUILTIN_MODELS = {"minilm": "bevel.models.minilm:build", "tinylm": "bevel.models.tinylm:build"}

__all__ = ["BUILTIN_MODELS"]
