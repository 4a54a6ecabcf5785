"""KV-cache compression passes for decoder step graphs: ``kv.quantize`` (8- or 4-bit keys and values)
and ``kv.evict`` (heavy-hitter eviction during decode)."""

from bevel.passes.kv import evict, quantize  # noqa: F401  (registers the passes)
