"""The attention of each layer of a decoder step graph, read as what it computes (queries, the cache
after the step's write, scale, per-head windows, block table), and rewritten as ``bevel::sparse_attention``.

Attention passes and the decode runtime both start here: :func:`decoder_attention` reads the sites
:func:`bevel.ir.decoder.attention_sites` finds, whether they are still the captured SDPA or already
a bevel attention op, and :func:`rewrite_sparse` puts the sparse op in a site's place. A captured SDPA
reads as windowed where the model slides its own window (Mistral's, Qwen2's sliding layers): its mask
was built from the positions with that window, and a pass that asks for a wider window or none keeps
it (:func:`narrowed`), since replacing the mask would let the layer see tokens it never saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from bevel.ir.decoder import NATIVE_WINDOWS, AttentionSite, attention_sites
from bevel.ir.graph import Graph

aten = torch.ops.aten
NOT_A_DECODER = ("it is not a decoder step graph (it has no kv_positions and past_key_i inputs): attention and "
                 "KV-cache passes rewrite causal LMs compiled as decoders (an HF ...ForCausalLM given to "
                 "bevel.compile, decoder=True)")


@dataclass
class Attention:
    """One layer's attention: ``out = attention(q, key, value)`` over the cache as written this step."""

    site: AttentionSite
    q: fx.Node               # [B, Hq, T, D]
    key: fx.Node             # the key cache after the step's write, [B, Hkv, L, D]
    value: fx.Node
    scale: float
    heads: int
    kv_heads: int
    head_dim: int
    window: list[int]        # per head (or one for all); 0: no window
    sinks: list[int]
    table: fx.Node | None    # a block index table, after attention.block_sparse
    block: int

    @property
    def node(self) -> fx.Node:
        """The attention node itself."""
        return self.site.attention

    @property
    def layer(self) -> int:
        """The layer number (the index of its ``past_key_i`` input)."""
        return self.site.layer


def _shape(node: fx.Node) -> tuple[Any, ...]:
    return tuple(node.meta["val"].shape)


def _ancestor_inputs(node: fx.Node) -> set[str]:
    seen, stack, names = set(), [node], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "placeholder":
            names.add(current.name)
        stack.extend(current.all_input_nodes)
    return names


def read_site(site: AttentionSite, native_window: int = 0) -> Attention | str:
    """What ``site`` computes, or why it cannot be rewritten (a sentence); ``native_window`` is the
    model's own sliding window at this layer (0: none), which a captured SDPA's mask holds."""
    node = site.attention
    key_shape = _shape(site.key_write)
    q = node.args[0]
    heads, head_dim = _shape(q)[1], _shape(q)[3]
    common = dict(site=site, q=q, key=site.key_write, value=site.value_write, heads=heads, kv_heads=key_shape[1],
                  head_dim=head_dim)
    if not all(isinstance(x, int) for x in (heads, key_shape[1], head_dim)):
        return f"layer {site.layer}: the head counts or head size are not fixed numbers"
    if node.target == aten.scaled_dot_product_attention.default:
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        dropout = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
        causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
        if dropout or causal or not isinstance(mask, fx.Node):
            return (f"layer {site.layer}: {node.name} is not the step graph's attention by positions (dropout, "
                    f"is_causal or no mask)")
        if not _ancestor_inputs(mask) <= {"position_ids", "kv_positions"}:
            return (f"layer {site.layer}: the mask of {node.name} reads more than the positions (a model with its own "
                    f"attention pattern, such as a native sliding window)")
        scale = node.kwargs.get("scale")
        return Attention(**common, scale=float(scale) if scale is not None else head_dim ** -0.5,
                         window=[native_window], sinks=[0], table=None, block=64)
    if node.target == torch.ops.bevel.sparse_attention.default:
        window, sinks, table, block, scale = node.args[5:10]
        return Attention(**common, scale=float(scale), window=list(window), sinks=list(sinks), table=table,
                         block=int(block))
    return f"layer {site.layer}: {node.name} is {node.target}, which attention passes do not rewrite"


def decoder_attention(graph: Graph) -> list[Attention] | str:
    """Every layer's attention of a decoder step graph, or why there is none to rewrite: the graph is
    not a decoder's, has no attention, or a site is one the passes cannot read (named)."""
    names = {n.name for n in graph.inputs()}
    if "kv_positions" not in names or "position_ids" not in names or not any(n.startswith("past_key_")
                                                                                for n in names):
        return NOT_A_DECODER
    sites = attention_sites(graph)
    if not sites:
        return "the step graph has no attention that reads the KV cache"
    native = graph.module.meta.get(NATIVE_WINDOWS) or []
    found = [read_site(site, native[site.layer] if site.layer < len(native) else 0) for site in sites]
    problems = [f for f in found if isinstance(f, str)]
    return problems[0] if problems else found


def narrowed(attention: Attention, window: int, sinks: int,
             streaming: list[bool] | None = None) -> tuple[list[int], list[int]]:
    """The windows and sinks, per head (one pair for all when the attention has one and ``streaming`` is
    None), of ``attention`` once a pass gives its heads (those ``streaming`` marks, else all) the last
    ``window`` tokens and the first ``sinks``: a head whose own window (the model's sliding window) is
    already at most ``window`` keeps it and its sinks, since the pass would widen what the head sees."""
    count = attention.heads if streaming is not None or len(attention.window) > 1 else 1
    own_windows = attention.window * count if len(attention.window) == 1 else list(attention.window)
    own_sinks = attention.sinks * count if len(attention.sinks) == 1 else list(attention.sinks)
    windows, kept_sinks = [], []
    for own_window, own_sink, applies in zip(own_windows, own_sinks, streaming or [True] * count):
        narrower = applies and (own_window == 0 or own_window > window)
        windows.append(window if narrower else own_window)
        kept_sinks.append(sinks if narrower else own_sink)
    return windows, kept_sinks


def positions(graph: Graph) -> tuple[fx.Node, fx.Node]:
    """The ``position_ids`` and ``kv_positions`` inputs of a step graph."""
    placeholders = {n.name: n for n in graph.inputs()}
    return placeholders["position_ids"], placeholders["kv_positions"]


def rewrite_sparse(graph: Graph, attention: Attention, window: list[int], sinks: list[int],
                   table: fx.Node | None, block: int) -> fx.Node:
    """Put ``bevel::sparse_attention`` with these windows, sinks and table in the site's place (the
    caller refreshes the graph). ``table`` must be computed before the site."""
    q_positions, kv_positions = positions(graph)
    with graph.fx_graph.inserting_before(attention.node):
        new = graph.fx_graph.call_function(torch.ops.bevel.sparse_attention.default, (
            attention.q, attention.key, attention.value, q_positions, kv_positions, list(window), list(sinks), table,
            block, attention.scale))
    new.meta = {k: v for k, v in attention.node.meta.items() if k != "val"}
    graph.replace_node(attention.node, new)
    attention.site.attention = new
    attention.window, attention.sinks, attention.table, attention.block = list(window), list(sinks), table, block
    return new


def record_policy(graph: Graph, **fields: Any) -> None:
    """Note in the graph how the decode loop must keep the cache (see ``CachePolicy``)."""
    from bevel.ir.decoder import GRAPH_POLICY

    graph.module.meta.setdefault(GRAPH_POLICY, {}).update(fields)
