"""``kv.quantize``: the KV cache stored in 8 or 4 bits per token and head, in groups of channels (the
KIVI / ZipCache family), dequantized inside the attention kernel.

In the step graph every key and value is rounded to its codes before it is written
(``bevel::quantize_kv`` then ``bevel::dequantize_kv``), so the prefill, ``cm.step``, the fidelity
check and the ONNX export all compute with exactly the values a quantized cache holds. The decode
loop goes further (see ``bevel.runtime.cache_graph``): its cache holds the codes and group
parameters themselves, and ``bevel::cache_attention`` dequantizes them as it reads, so the cache
takes a quarter (8 bits) or about an eighth (4 bits) of its float32 memory.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from bevel.errors import PassError
from bevel.ir.attention import decoder_attention, record_policy
from bevel.ir.graph import Graph
from bevel.passes.base import Pass, PassContext, PassParams, PassResult, param
from bevel.passes.registry import register_pass
from bevel.runtime.ops.kv_quant import BITS, code_width, params_per_group


@register_pass("kv.quantize")
class KVQuantize(Pass):
    """Store keys and values in int8 (or int4 with groups) per token and head; attention dequantizes
    them as it reads (KIVI / ZipCache family)."""

    # run twice, the step graph would round the cache twice while the decode loop rounds it once
    conflicts = ("attention.block_sparse", "kv.quantize")
    not_followed_by = tuple((name, "its cache codes and scales leave every block beside the hidden state, and "
                                   "layer skipping needs each block to hand on the hidden state alone")
                            for name in ("layer_skip.static", "layer_skip.early_exit"))

    @dataclass
    class Params(PassParams):
        bits: int = param(8, "bits per stored key and value: 8 (symmetric) or 4 (with each group's low end)",
                          choices=BITS)
        group_size: int | None = param(None, "channels sharing one scale; must divide the head dimension (none: "
                                             "the whole head)", ge=1)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Round every cache write to its codes; record the quantized storage for the decode loop."""
        attentions = decoder_attention(graph)
        if isinstance(attentions, str):
            return PassResult(changed=False, notes=[f"nothing changed: {attentions}"])
        bits, dim = self.params.bits, attentions[0].head_dim
        group = self.params.group_size or dim
        if dim % group or (bits == 4 and group % 2):
            raise PassError(f"kv.quantize(group_size={group}): the group size must divide the head dimension {dim}"
                            + (" and be even (two 4-bit codes per byte)" if bits == 4 else "")
                            + f"; try group_size={dim} or a divisor of it")
        kv_heads, dtype = attentions[0].kv_heads, attentions[0].key.meta["val"].dtype
        before = 2 * kv_heads * dim * dtype.itemsize
        after = _cache_bytes(kv_heads, dim, bits, group)
        if after >= before:  # small groups: their scales take more than the codes save
            smallest = min((g for g in range(1, dim + 1) if not dim % g and not (bits == 4 and g % 2)
                            and _cache_bytes(kv_heads, dim, bits, g) < before), default=None)
            raise PassError(f"kv.quantize(bits={bits}, group_size={group}): the groups' scales take more memory than "
                            f"the codes save: the cache would hold {after} bytes per token and layer against {before} "
                            f"unquantized; " + (f"use group_size={smallest} or larger" if smallest else
                                                f"no group size saves memory on heads of {dim} channels"))
        for attention in attentions:
            for write in (attention.site.key_write, attention.site.value_write):
                _round_write(graph, write, bits, group)
        graph.refresh()
        record_policy(graph, bits=bits, group_size=group)
        return PassResult(changed=True, notes=[
            f"{len(attentions)} layers: keys and values rounded to {bits}-bit codes in groups of {group} channels; "
            f"the decode loop's cache holds {after} bytes per token and layer instead of {before} "
            f"({after / before:.3f} of it)"],
            stats={"layers": len(attentions), "bits": bits, "group_size": group, "bytes_per_token_layer": after,
                   "float_bytes_per_token_layer": before})


def _round_write(graph: Graph, write: fx.Node, bits: int, group: int) -> None:
    """``index_copy(cache, dim, slots, x)`` -> ``index_copy(cache, dim, slots, dequantize(quantize(x)))``."""
    source = write.args[3]
    dtype = write.args[0].meta["val"].dtype
    with graph.fx_graph.inserting_before(write):
        quantized = graph.fx_graph.call_function(torch.ops.bevel.quantize_kv.default, (source, bits, group))
        codes = graph.fx_graph.call_function(operator.getitem, (quantized, 0))
        params = graph.fx_graph.call_function(operator.getitem, (quantized, 1))
        values = graph.fx_graph.call_function(torch.ops.bevel.dequantize_kv.default, (codes, params, bits, group,
                                                                                      dtype))
    write.args = (*write.args[:3], values)


def _cache_bytes(kv_heads: int, dim: int, bits: int, group: int) -> int:
    """Bytes of a quantized cache per token and layer: keys and values, codes and float32 group parameters."""
    return 2 * kv_heads * (code_width(dim, bits) + 4 * params_per_group(bits) * (dim // group))
