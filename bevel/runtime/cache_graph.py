"""The decode loop's copy of a step graph, rewritten for how the cache is kept (``CachePolicy``).

The step graph always reads and writes a float cache; the decode loop's graphs may keep it otherwise:

- quantized storage (``kv.quantize``): the step graph writes ``dequantize_kv(quantize_kv(x))``; here
  the cache tensors hold the codes and a second tensor per key and value (``key_params_i``,
  ``value_params_i`` [B, Hkv, L, groups, P]) the group parameters, both written at the step's slots,
  and attention becomes ``bevel::cache_attention``, which dequantizes as it reads: the same values,
  a quarter or an eighth of the memory;
- eviction (``kv.evict``): every layer's attention becomes ``bevel::cache_attention`` returning the
  attention mass per slot (appended to the outputs as ``mass_i``) and reading the slot positions of
  its own layer and KV head (``kv_positions_i`` [B, Hkv, L]), since each evicts its own entries.

Runtime graph inputs: the step inputs, the key and value caches, then ``key_params_i``/``value_params_i``
of every layer (quantized storage), then ``kv_positions_i`` of every layer (eviction); outputs: the
logits, the caches in the same order, then ``mass_i`` (None for a layer without attention).
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from bevel.errors import BevelError
from bevel.ir.attention import Attention, decoder_attention
from bevel.ir.decoder import CachePolicy
from bevel.ir.graph import Graph
from bevel.runtime.ops.kv_quant import code_width, params_per_group

CACHE_ATTENTION = torch.ops.bevel.cache_attention.default
DEQUANTIZE = torch.ops.bevel.dequantize_kv.default


@dataclass(frozen=True)
class StorageLayout:
    """What the runtime graphs hold besides the step inputs and the key and value caches."""

    quantized: bool
    per_layer_positions: bool

    @classmethod
    def of(cls, policy: CachePolicy) -> "StorageLayout":
        """The layout a cache policy needs."""
        return cls(quantized=policy.bits is not None, per_layer_positions=policy.budget is not None)

    @property
    def plain(self) -> bool:
        """Whether the runtime graphs are the step graph's own layout."""
        return not (self.quantized or self.per_layer_positions)


def params_names(num_layers: int) -> list[str]:
    """``key_params_0, value_params_0, key_params_1, ...``."""
    return [f"{kind}_params_{i}" for i in range(num_layers) for kind in ("key", "value")]


def positions_names(num_layers: int) -> list[str]:
    """``kv_positions_0, kv_positions_1, ...``."""
    return [f"kv_positions_{i}" for i in range(num_layers)]


def storage_graph(step: fx.GraphModule, num_layers: int, policy: CachePolicy) -> fx.GraphModule:
    """A copy of ``step`` (sharing its weights) rewritten for ``policy`` as the module docstring says;
    the copy itself when the policy needs nothing."""
    module = fx.GraphModule(step, copy.deepcopy(step.graph))
    # GraphModule copies no meta: the model's own sliding windows (``NATIVE_WINDOWS``), which a captured
    # attention's mask holds, must reach bevel::cache_attention
    module.meta.update(step.meta)
    layout = StorageLayout.of(policy)
    if layout.plain:
        return module
    graph = Graph(module, ())
    attentions = decoder_attention(graph)
    if isinstance(attentions, str):
        raise BevelError(f"the decoder's cache policy {policy.to_json()} cannot be applied: {attentions}")
    fx_graph = module.graph
    placeholders = {n.name: n for n in fx_graph.nodes if n.op == "placeholder"}
    last = [n for n in fx_graph.nodes if n.op == "placeholder"][-1]
    added: dict[str, fx.Node] = {}
    names = (params_names(num_layers) if layout.quantized else []) + \
        (positions_names(num_layers) if layout.per_layer_positions else [])
    for name in names:
        with fx_graph.inserting_after(last):
            last = added[name] = fx_graph.placeholder(name)
    by_layer = {a.layer: a for a in attentions}
    params_out: list[fx.Node] = []
    masses: list[fx.Node | None] = []
    for layer in range(num_layers):
        key_cache, value_cache = placeholders[f"past_key_{layer}"], placeholders[f"past_value_{layer}"]
        attention = by_layer.get(layer)
        if layout.quantized:
            key_params, value_params = added[f"key_params_{layer}"], added[f"value_params_{layer}"]
            _describe_storage(key_cache, key_params, policy)
            _describe_storage(value_cache, value_params, policy)
        own = placeholders["kv_positions"]
        if layout.per_layer_positions:
            own = added[f"kv_positions_{layer}"]
            own.meta["val"] = key_cache.meta["val"].new_empty(key_cache.meta["val"].shape[:3], dtype=torch.int64)
        if attention is None:  # a layer a pass removed: its cache passes through
            params_out += [key_params, value_params] if layout.quantized else []
            masses.append(None)
            continue
        if attention.table is not None:
            raise BevelError(f"layer {layer}: a block-sparse attention (attention.block_sparse) cannot read a "
                             f"quantized or evicting cache")
        written: list[fx.Node | None] = [None, None]
        if layout.quantized:
            written = [_store_codes(fx_graph, attention.site.key_write, key_params),
                       _store_codes(fx_graph, attention.site.value_write, value_params)]
            params_out += written
        masses.append(_cache_attention(fx_graph, attention, placeholders["position_ids"], own, written, policy,
                                       layout.per_layer_positions))
    (output,) = [n for n in fx_graph.nodes if n.op == "output"]
    flat = tuple(output.args[0])
    extra = tuple(params_out) + (tuple(masses) if layout.per_layer_positions else ())
    output.args = (flat + extra,)
    fx_graph.eliminate_dead_code()
    module.recompile()
    return module


def _describe_storage(cache: fx.Node, params: fx.Node, policy: CachePolicy) -> None:
    """Shapes and dtypes of a quantized cache input and its group parameters (for the runtime's
    readers of node metadata, such as the early-exit runner)."""
    value = cache.meta["val"]
    if value.dtype in (torch.int8, torch.uint8):
        return  # already described
    batch, heads, length, dim = value.shape
    bits, group = policy.bits, policy.group_size or dim
    cache.meta["val"] = value.new_empty((batch, heads, length, code_width(dim, bits)),
                                        dtype=torch.int8 if bits == 8 else torch.uint8)
    params.meta["val"] = value.new_empty((batch, heads, length, dim // group, params_per_group(bits)),
                                         dtype=torch.float32)


def _store_codes(graph: fx.Graph, write: fx.Node, params: fx.Node) -> fx.Node:
    """``index_copy(cache, d, slots, dequantize(codes, p))`` -> writes of the codes into the cache and of
    ``p`` into ``params``; returns the written parameters."""
    values = write.args[3]
    if values.target != DEQUANTIZE:
        raise BevelError(f"the cache write {write.name} does not write kv.quantize's codes")
    codes, group_params = values.args[0], values.args[1]
    write.args = (*write.args[:3], codes)
    with graph.inserting_after(write):
        written = graph.call_function(torch.ops.aten.index_copy.default, (params, write.args[1], write.args[2],
                                                                          group_params))
    written.meta["val"] = params.meta["val"]
    return written


def _cache_attention(graph: fx.Graph, attention: Attention, q_positions: fx.Node, kv_positions: fx.Node,
                     params: list[fx.Node | None], policy: CachePolicy, with_mass: bool) -> fx.Node | None:
    """Put ``bevel::cache_attention`` in the site's place; returns its mass output (None without)."""
    node = attention.node
    bits = policy.bits or 0
    group = policy.group_size or attention.head_dim
    with graph.inserting_before(node):
        call = graph.call_function(CACHE_ATTENTION, (
            attention.q, attention.key, attention.value, params[0], params[1], q_positions, kv_positions,
            list(attention.window), list(attention.sinks), attention.scale, bits, group, with_mass))
        out = graph.call_function(operator.getitem, (call, 0))
        mass = graph.call_function(operator.getitem, (call, 1)) if with_mass else None
    out.meta = dict(node.meta)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return mass
