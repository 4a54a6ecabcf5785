"""Finding the transformer blocks of a graph: each attention, its keys, and the residual stream after it.

A block is recognized from its ``scaled_dot_product_attention`` node, however the model wrote it
(HF BERT, timm ViT, ``nn.MultiheadAttention``): its keys are the attention's second input
[B, heads, N, head_dim]; walking forward from the attention, the first ``add`` whose other operand
is an ancestor of the attention's query is the residual add, and the *stream* is that add (pre-norm
blocks) or the LayerNorm that alone reads it (post-norm blocks, as BERT). The stream must be
[B, N, C] with the keys' B and N: that is where tokens can be merged before the MLP. The attention
mask must be absent or built from one [B, N] graph input (a padding mask: with that input at ones it
masks nothing, so a causal or local mask is no padding mask), which the token reducing passes then
take over. What is not recognized is returned with the node and the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from bevel.ir.analysis import ancestors
from bevel.ir.arguments import argument
from bevel.ir.evaluate import evaluate, example_of, masks_nothing
from bevel.ir.graph import Graph

aten = torch.ops.aten

ATTENTION_OPS = (aten.scaled_dot_product_attention.default,)
SOFTMAX_OPS = (aten._softmax.default, aten.softmax.int, aten._safe_softmax.default)
LAYER_NORMS = (aten.layer_norm.default,)
# how far past the attention the residual add may be (projection, dropout, layer scale, reshapes)
RESIDUAL_SEARCH_DEPTH = 12


@dataclass
class AttentionBlock:
    """One recognized transformer block: where its tokens can be merged, and what to merge them by."""

    attention: fx.Node   # the scaled_dot_product_attention node
    keys: fx.Node        # its key input [B, heads, N, head_dim]
    input: fx.Node       # the block's input: the residual stream before attention [B, N, C]
    stream: fx.Node      # the residual stream after attention [B, N, C]
    padding: fx.Node | None  # the [B, N] graph input its mask comes from, if it has a mask


def same_size(a, b) -> bool:
    """Whether two sizes (ints or SymInts) are certainly equal."""
    return statically_known_true(a == b)


def _residual_add(attention: fx.Node, before: set[fx.Node]) -> tuple[fx.Node, fx.Node] | None:
    """The first add after ``attention`` whose other operand is one of ``before``, and that operand
    (the block's input)."""
    frontier, seen = [attention], {attention}
    for _ in range(RESIDUAL_SEARCH_DEPTH):
        following = []
        for node in frontier:
            for user in node.users:
                if user in seen:
                    continue
                seen.add(user)
                if user.op == "call_function" and user.target == aten.add.Tensor:
                    others = [a for a in user.args[:2] if isinstance(a, fx.Node) and a is not node]
                    if others and others[0] in before:
                        return user, others[0]
                following.append(user)
        frontier = following
    return None


def _padding_input(graph: Graph, mask: fx.Node, tokens) -> fx.Node | None | str:
    """The [B, N] graph input an attention mask is built from; a reason string when it is not one."""
    inputs = [n for n in ancestors(mask, through_sizes=False) | {mask} if n.op == "placeholder"]
    # the batch size is not compared: export gives each input's batch a symbol of its own
    padding = [n for n in inputs if (s := graph.shape(n)) is not None and len(s) == 2 and same_size(s[1], tokens)]
    if len(inputs) != 1 or len(padding) != 1:
        names = ", ".join(sorted(n.name for n in inputs))
        if not names:  # a constant, or built from sizes alone
            reason = ("its attention mask is not a padding mask of one [batch, tokens] input (it reads no input; "
                      "`cleanup` earlier in the pipeline drops such a mask where it masks nothing)")
            if any(isinstance(n.meta.get("val"), torch.SymInt) for n in ancestors(mask)):
                reason += (": this one is computed from input sizes the capture keeps symbolic, at which cleanup "
                           "cannot show that it masks nothing (as DINOv2's all-true mask); captured with fixed "
                           "sizes (dynamic_shapes=\"static\") it is a constant")
            return reason
        return f"its attention mask is not a padding mask of one [batch, tokens] input (it reads {names})"
    return padding[0]


def recognize(graph: Graph, attention: fx.Node) -> AttentionBlock | str:
    """The block around one attention node, or why it is not one the token passes can rewrite."""
    if argument(attention, "is_causal", False):
        return "causal attention (a decoder): tokens cannot be merged"
    query, keys = attention.args[0], attention.args[1]
    key_shape = graph.shape(keys)
    if key_shape is None or len(key_shape) != 4:
        return f"its keys are not [batch, heads, tokens, head_dim] (shape {key_shape})"
    batch, tokens = key_shape[0], key_shape[2]
    found = _residual_add(attention, ancestors(query))
    if found is None:
        return "no residual add after it (not a transformer block)"
    add, block_input = found
    stream = add
    users = list(add.users)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target in LAYER_NORMS:
        stream = users[0]  # post-norm: the block continues from the normalized sum
    shape = graph.shape(stream)
    if shape is None or len(shape) != 3 or not (same_size(shape[0], batch) and same_size(shape[1], tokens)):
        return f"the residual stream '{stream.name}' is not [batch, tokens, channels] (shape {shape})"
    mask = argument(attention, "attn_mask", None)
    padding = None
    if mask is not None:
        padding = _padding_input(graph, mask, tokens)
        if isinstance(padding, str):
            return padding
        if not _masks_nothing_without_padding(graph, mask, padding):
            return (f"its attention mask hides tokens even where '{padding.name}' marks every token real (1): it "
                    f"is more than a padding mask (causal, as CLIP's text encoder, or local attention), which the "
                    f"token passes would replace")
    return AttentionBlock(attention, keys, block_input, stream, padding)


def _masks_nothing_without_padding(graph: Graph, mask: fx.Node, padding: fx.Node) -> bool:
    """Whether ``mask``, computed with the padding input at ones (every token real) and every other input
    it reads the size of at its example sizes, lets every query see every key: true for a padding mask,
    false for a causal or local one built with it (their nodes differ from a padding mask's by one
    comparison of positions), and false where it cannot be computed."""
    inputs = {}
    for node in ancestors(mask) | {mask}:
        if node.op == "placeholder":
            example = example_of(node)
            if example is None:
                return False
            inputs[node] = torch.ones_like(example) if node is padding else example
    value = evaluate(graph, mask, inputs)
    return value is not None and masks_nothing(value)


def _scores_softmax(graph: Graph, node: fx.Node) -> bool:
    """Whether a softmax is over square [..., N, N] scores: self-attention written out by hand."""
    shape = graph.shape(node)
    return shape is not None and len(shape) >= 3 and same_size(shape[-1], shape[-2])


def find_blocks(graph: Graph) -> tuple[list[AttentionBlock], list[tuple[str, str]]]:
    """The graph's transformer blocks in order, and the attentions left alone as ``(node, why)``.

    Merging changes the tokens every later layer sees, so a block is only rewritten if every
    attention after it is one too: the blocks before an attention that is not recognized are left
    alone (and reported), as is a block that does not read the stream of the block before it.
    """
    blocks, skipped = [], []
    for node in graph.nodes(op="call_function"):
        reason = None
        if node.target in SOFTMAX_OPS and _scores_softmax(graph, node):
            reason = ("a softmax over [tokens, tokens] scores outside scaled_dot_product_attention (attention "
                      "written out by hand, or nn.MultiheadAttention with need_weights=True) is not recognized; "
                      "`fuse_attention` earlier in the pipeline makes such attention one op where it can")
        elif node.target in ATTENTION_OPS:
            found = recognize(graph, node)
            if isinstance(found, str):
                reason = found
            elif blocks and blocks[-1].stream not in ancestors(node):
                reason = f"it does not read the stream of the block before ('{blocks[-1].stream.name}')"
            else:
                blocks.append(found)
        if reason is not None:
            skipped.append((node.name, reason))
            skipped += [(b.attention.name, f"an attention after it ('{node.name}') is not recognized, and merging "
                                           f"here would change the tokens it reads") for b in blocks]
            blocks = []
    return blocks, skipped


def padding_mask_input(graph: Graph) -> int | None:
    """The flat position of the graph input that is an encoder's padding mask: the [batch, tokens]
    input the attention masks of its transformer blocks are built from, else an input of that rank
    named ``attention_mask`` (HF's name for it: encoders whose attention is not SDPA, which the blocks
    here do not read, such as DeBERTa's and MPNet's); None for a model without one (no mask, a causal
    decoder)."""
    blocks, _ = find_blocks(graph)
    if blocks and blocks[0].padding is not None:
        return graph.inputs().index(blocks[0].padding)
    for index, node in enumerate(graph.inputs()):
        shape = graph.shape(node)
        if node.name == "attention_mask" and shape is not None and len(shape) == 2:
            return index
    return None
