"""``fuse_attention``: attention written out as matrix products and a softmax becomes one
``scaled_dot_product_attention``.

HF models in eager attention, timm blocks with ``fused_attn=False``, ``nn.MultiheadAttention``
with ``need_weights=True`` and hand-written blocks compute ``softmax(q @ k^T * scale + mask) @ v``
op by op, materializing the [.., tokens, tokens] weights. The passes that work on attention
(``tome``, ``prune.structured``'s heads, ``attention.*``) recognize the fused op only, and on the
CPU its fused kernel is faster. The chain is matched from each softmax over the last dimension:

    scores = matmul(q, kt) | bmm(q, kt) | baddbmm(mask, q, kt)   (kt: k with its last two dims swapped)
    scores = scores * c | scores / c                               (any number of constant factors)
    scores = scores + mask                                         (an additive mask, optional)
    weights = softmax(scores, -1)  [dropout in eval]
    out = matmul(weights, v) | bmm(weights, v)

and replaced by ``scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=c)``. Where the
queries, keys and values are [batch * heads, tokens, head_dim] made by folding the heads of a
[tokens, batch, heads * head_dim] projection into the batch (``nn.MultiheadAttention``), the fused
op takes them unfolded, [batch, heads, tokens, head_dim], as attention written with heads does: its
result is the same (attention is computed per leading index either way), and the passes that work on
heads and tokens (``tome``, head pruning) find the batch, heads and keys where they look. A chain whose
intermediate values are read elsewhere (the attention weights returned as an output), with casts
between its ops or a softmax in another dtype is left alone and named in the report. The result
equals the chain's up to float rounding (the fused kernel sums in another order), except for a row
whose every score is masked to -inf: NaN written out, zeros from the fused op (torch 2.14).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.fx as fx

from bevel.ir.analysis import VIEW_OPS
from bevel.ir.graph import Graph
from bevel.passes.base import Pass, PassContext, PassResult
from bevel.passes.cleanup import DROPOUT_OPS
from bevel.passes.registry import register_pass
from bevel.passes.tome.blocks import SOFTMAX_OPS, same_size

aten = torch.ops.aten

_PRODUCTS = (aten.matmul.default, aten.bmm.default)


@dataclass
class _Chain:
    """The parts of one written-out attention."""

    query: fx.Node
    key_transposed: fx.Node
    value: fx.Node
    mask: fx.Node | None
    scale: float
    nodes: list[fx.Node]  # the chain's ops, each read only by the next, from the output back to the product

    @property
    def output(self) -> fx.Node:
        return self.nodes[0]


@register_pass("fuse_attention")
class FuseAttention(Pass):
    """Replace attention written out as matmul, softmax, matmul by scaled_dot_product_attention."""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        graph.refresh(shapes=False)  # outputs nobody reads (weights an attention module returned) go
        fused, notes = [], []
        for softmax in list(graph.nodes(op="call_function", target=SOFTMAX_OPS)):
            found = _match(graph, softmax)
            if isinstance(found, str):
                notes.append(f"left alone: softmax '{softmax.name}': {found}")
                continue
            fused.append(_fuse(graph, found).name)
        if not fused:
            return PassResult(changed=False, stats={"fused": 0},
                              notes=notes + ["no attention written out as matmul, softmax, matmul: nothing changed"])
        graph.refresh()
        return PassResult(changed=True, stats={"fused": len(fused), "attention": fused}, notes=notes)


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _match(graph: Graph, softmax: fx.Node) -> _Chain | str:
    """The chain around ``softmax``, or why it is not one this pass fuses."""
    scores = softmax.args[0]
    rank = len(graph.shape(softmax) or ())
    if rank < 3 or softmax.args[1] % rank != rank - 1:
        return "not a softmax over the last dimension of a batch of score matrices"
    if softmax.target == aten._softmax.default:  # (x, dim, half_to_float)
        if softmax.args[2]:
            return "the softmax computes in another dtype"
    elif softmax.kwargs.get("dtype", softmax.args[2] if len(softmax.args) > 2 else None) not in (None,
                                                                                                graph.dtype(scores)):
        return "the softmax changes the dtype"
    weights, user, dropouts = softmax, _only_user(softmax), []
    while user is not None and user.target in DROPOUT_OPS and (user.args[1] == 0 or not user.args[2]):
        dropouts.insert(0, user)  # dropout in eval mode, or with p = 0: the identity
        weights, user = user, _only_user(user)
    if user is None or user.target not in _PRODUCTS or user.args[0] is not weights:
        return "its weights are read by something else than one product with the values"
    value = user.args[1]
    mask, scale = None, 1.0
    nodes = [user, *dropouts, softmax]
    node = scores
    while True:
        if not isinstance(node, fx.Node) or len(node.users) != 1:
            return "an intermediate value of its scores is read elsewhere"
        nodes.append(node)
        if node.target in (aten.mul.Tensor, aten.div.Tensor) and isinstance(node.args[1], numbers.Number):
            scale = scale * node.args[1] if node.target == aten.mul.Tensor else scale / node.args[1]
            node = node.args[0]
        elif node.target in (aten.add.Tensor, aten.baddbmm.default) and scale != 1.0:
            return "a constant factor after its mask scales the mask too"
        elif node.target == aten.add.Tensor and mask is None and len(node.args) == 2 and \
                all(isinstance(a, fx.Node) for a in node.args):
            if node.kwargs.get("alpha", 1) != 1:
                return "its mask is added with a factor"
            scores_side = [a for a in node.args if _leads_to_product(a)]
            if len(scores_side) != 1:
                return "it adds two tensors neither of which (or both of which) are the scores"
            mask = node.args[1] if scores_side[0] is node.args[0] else node.args[0]
            node = scores_side[0]
        elif node.target == aten.baddbmm.default and mask is None:
            beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
            if beta != 1 or not isinstance(alpha, numbers.Number):
                return "its scores scale their mask"
            return _checked(graph, _Chain(node.args[1], node.args[2], value, node.args[0], scale * alpha, nodes),
                            softmax)
        elif node.target in _PRODUCTS:
            return _checked(graph, _Chain(node.args[0], node.args[1], value, mask, scale, nodes), softmax)
        else:
            return f"its scores come from {node.target}, not a product of queries and keys"


def _leads_to_product(node: fx.Node) -> bool:
    """Whether ``node`` is query-key products, maybe scaled by constants."""
    while isinstance(node, fx.Node) and node.target in (aten.mul.Tensor, aten.div.Tensor) \
            and isinstance(node.args[1], numbers.Number):
        node = node.args[0]
    return isinstance(node, fx.Node) and node.target in (*_PRODUCTS, aten.baddbmm.default)


def _checked(graph: Graph, chain: _Chain, softmax: fx.Node) -> _Chain | str:
    """``chain`` if its tensors have the shapes and dtypes attention takes."""
    shapes = [graph.shape(n) for n in (chain.query, chain.key_transposed, chain.value)]
    if any(s is None for s in shapes) or len({len(s) for s in shapes}) != 1 or len(shapes[0]) < 3:
        return "its queries, keys and values are not batches of matrices of one rank"
    dtypes = {graph.dtype(n) for n in (chain.query, chain.key_transposed, chain.value, softmax)}
    if len(dtypes) != 1 or not dtypes.pop().is_floating_point:
        return "its tensors do not share one floating dtype"
    if chain.mask is not None and graph.dtype(chain.mask) != graph.dtype(softmax):
        return "its mask has another dtype (a boolean added is 0 or 1, not keep or drop)"
    product = chain.nodes[-1]
    if [str(d) for d in graph.shape(product)] != [str(d) for d in graph.shape(softmax)]:
        return "its mask broadcasts the scores to a larger shape"
    return chain


def _fuse(graph: Graph, chain: _Chain) -> fx.Node:
    """Insert the fused attention before the chain's output and hand it the output's users."""
    with graph.fx_graph.inserting_before(chain.output):
        key = chain.key_transposed
        rank = len(graph.shape(key))
        if key.target == aten.transpose.int and {d % rank for d in key.args[1:3]} == {rank - 2, rank - 1}:
            key = key.args[0]
        else:
            key = graph.fx_graph.call_function(aten.transpose.int, (key, -2, -1))
        inputs = (chain.query, key, chain.value, chain.mask)
        heads = _folded_heads(graph, chain)
        if heads is not None:
            inputs = tuple(_unfolded(graph, node, heads) for node in inputs)
        fused = graph.fx_graph.call_function(aten.scaled_dot_product_attention.default, inputs,
                                             {"scale": float(chain.scale)})
        output = fused if heads is None else graph.fx_graph.call_function(aten.flatten.using_ints, (fused, 0, 1))
    for node in (fused, output):
        _take_origin(node, chain.output)
    chain.output.replace_all_uses_with(output)
    for node in chain.nodes:  # erased here: dead code elimination keeps a dropout (a random op) and all before it
        graph.fx_graph.erase_node(node)
    if heads is not None:
        _merge_heads_last(graph, fused, output)
    return fused


def _merge_heads_last(graph: Graph, fused: fx.Node, output: fx.Node) -> None:
    """Where the refolded output [B * H, T, D] is only transposed to [T, B * H, D] and reshaped (to
    [T * B, H * D] before the output projection, as ``nn.MultiheadAttention`` does), the reshapes read
    ``fused.permute(2, 0, 1, 3)`` [T, B, H, D] instead: the same elements in the same order, and heads
    merged with head_dim alone, as attention written with heads merges them (head pruning follows that)."""
    users = list(output.users)
    if len(users) != 1 or users[0].target != aten.transpose.int or {d % 3 for d in users[0].args[1:3]} != {0, 1}:
        return
    reshapes = list(users[0].users)
    if not reshapes or any(r.target != aten.reshape.default or r.args[0] is not users[0] for r in reshapes):
        return
    with graph.fx_graph.inserting_after(users[0]):
        heads_last = graph.fx_graph.call_function(aten.permute.default, (fused, [2, 0, 1, 3]))
    _take_origin(heads_last, output)
    for reshape in reshapes:
        reshape.replace_input_with(users[0], heads_last)


def _heads_of_fold(graph: Graph, node: fx.Node) -> int | None:
    """The heads ``node`` folds into its batch, where it is ``x.view(T, B * H, D).transpose(0, 1)`` of
    ``x`` [T, B, H * D] (maybe times constants, as the scaled queries): [B * H, T, D], batch-major."""
    while node.target in (aten.mul.Tensor, aten.div.Tensor) and isinstance(node.args[1], numbers.Number):
        node = node.args[0]
    if node.target != aten.transpose.int or {d % 3 for d in node.args[1:3]} != {0, 1}:
        return None
    view = node.args[0]
    if view.target not in VIEW_OPS:
        return None
    before, after = graph.shape(view.args[0]), graph.shape(view)
    if before is None or after is None or len(before) != 3 or len(after) != 3 or not same_size(before[0], after[0]):
        return None
    channels, head_dim = before[2], after[2]
    if not isinstance(channels, int) or not isinstance(head_dim, int) or channels % head_dim:
        return None
    heads = channels // head_dim
    return heads if heads > 1 and same_size(after[1], before[1] * heads) else None


def _folded_heads(graph: Graph, chain: _Chain) -> int | None:
    """The heads folded into the batch of the chain's queries, keys and values, where all three fold
    the same number (see :func:`_heads_of_fold`)."""
    key = chain.key_transposed
    if key.target != aten.transpose.int or {d % 3 for d in key.args[1:3]} != {1, 2}:
        return None
    heads = {_heads_of_fold(graph, node) for node in (chain.query, key.args[0], chain.value)}
    if len(heads) != 1 or None in heads:
        return None
    mask_shape = graph.shape(chain.mask) if chain.mask is not None else None
    if chain.mask is not None and (mask_shape is None or len(mask_shape) != 3 or not (
            _is_one(mask_shape[0]) or same_size(mask_shape[0], graph.shape(chain.query)[0]))):
        return None  # a mask that is neither one for all nor one per head and batch entry
    return heads.pop()


def _unfolded(graph: Graph, node: fx.Node | None, heads: int) -> fx.Node | None:
    """``node`` [B * H, ...] as [B, H, ...]; a mask shared by all, [1, ...], as [1, 1, ...]. A mask
    that is itself a [B, H, ...] tensor folded (a padding mask expanded to every head) is taken as it
    was before the fold, so head pruning still sees it is one mask repeated for every head."""
    if node is None:
        return None
    shape = graph.shape(node)
    if node.target in VIEW_OPS:
        before = graph.shape(node.args[0])
        if before is not None and len(before) == len(shape) + 1 and isinstance(before[1], int) and \
                before[1] == heads and same_size(before[0] * heads, shape[0]) and \
                all(same_size(a, b) for a, b in zip(before[2:], shape[1:])):
            return node.args[0]
    if _is_one(shape[0]):
        return graph.fx_graph.call_function(aten.unsqueeze.default, (node, 0))
    return graph.fx_graph.call_function(aten.unflatten.int, (node, 0, [-1, heads]))


def _is_one(size) -> bool:
    return isinstance(size, int) and size == 1


def _take_origin(node: fx.Node, source: fx.Node) -> None:
    """Give ``node`` the module path and source line of ``source``, for reports and error messages."""
    node.meta.update({k: v for k, v in source.meta.items() if k in ("nn_module_stack", "stack_trace")})
