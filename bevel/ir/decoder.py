"""Decoder language models as one *step* graph with an explicit, preallocated KV cache.

A step takes ``T`` new tokens per sequence and the cache, and returns their logits and the cache
with the new keys and values written in:

    step(input_ids [B, T], position_ids [B, T], cache_position [T], kv_positions [B, L],
         past_key_0 [B, Hkv, L, D], past_value_0, ..., past_value_{n-1})
      -> {"logits": [B, T, V], "present_key_0": [B, Hkv, L, D], ...}

``cache_position`` holds the cache slots the new tokens go to (shared by the batch: prompts are
left-padded), ``position_ids`` each token's position in its own sequence (what RoPE or a position
table reads), ``kv_positions`` the position of the token each slot holds after this step (-1 for an
empty or padding slot). Attention is decided by positions alone: a query sees the slots holding a
position at or before its own, so a pass may bound it by distance (a window) or keep the first
positions (sinks), and a runtime may place tokens in any slot. With ``T`` = the prompt length it
is the prefill, with ``T = 1`` a decode step: the batch, ``T`` and the cache length ``L`` stay
symbolic.

The graph is the model's own HF code run over a cache object whose ``update`` writes into those
tensors (``aten.index_copy``), and a ready 4-D mask built from the positions, so attention stays
``aten.scaled_dot_product_attention``: :func:`attention_sites` names, per layer, that node and the
cache inputs and writes that feed it.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from bevel.errors import BevelError, CaptureError
from bevel.ir.analysis import descendants
from bevel.ir.capture import capture
from bevel.ir.graph import Graph

STEP_INPUTS = ("input_ids", "position_ids", "cache_position", "kv_positions")


class NotACausalLMError(BevelError):
    """A decoder-only feature (``generate``, a KV cache) was asked of a model that is not a causal LM."""


@dataclass(frozen=True)
class CachePolicy:
    """How the decode loop keeps the KV cache, set by the attention and KV-cache passes (all off by
    default: every token's keys and values, in the cache dtype).

    ``window``/``sinks``: a ring buffer of ``sinks + window`` slots (``attention.window``);
    ``bits``/``group_size``: keys and values stored as ``bevel::quantize_kv`` codes (``kv.quantize``);
    ``budget``/``recent``: at most ``budget`` entries per sequence and KV head, the ``recent`` newest
    always kept, the others by accumulated attention (``kv.evict``).
    """

    window: int | None = None
    sinks: int = 0
    bits: int | None = None
    group_size: int | None = None
    budget: int | None = None
    recent: int = 0

    def to_json(self) -> dict[str, Any]:
        """The fields that differ from the defaults."""
        default = CachePolicy()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "CachePolicy":
        """The policy :meth:`to_json` wrote (unknown keys are refused: they would be silently dropped)."""
        return cls(**(data or {}))


GRAPH_POLICY = "bevel_kv_cache"  # GraphModule.meta key where passes record the cache policy they need
# GraphModule.meta key of the model's own sliding window per layer (0: full attention), which attention
# passes may narrow but must not widen
NATIVE_WINDOWS = "bevel_native_windows"


@dataclass(frozen=True)
class DecoderSpec:
    """What the runtime needs to allocate a cache and run a decode loop for a captured decoder."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_cache_len: int
    eos_token_id: int | tuple[int, ...] | None = None  # several where the model ends text with any of them
    pad_token_id: int = 0
    cache_dtype: str = "float32"
    cache_policy: CachePolicy = CachePolicy()
    # where position embeddings are a table (GPT-2, OPT), its rows: no token may sit at a later position
    max_positions: int | None = None
    # each layer's KV heads where a pass removed some (prune.structured); None: num_kv_heads in every layer
    kv_heads: tuple[int, ...] | None = None
    # each layer's own sliding window (0: full attention) where the model slides one (Mistral, Gemma 2/3, Qwen2
    # with use_sliding_window); None: no layer slides. The step graph's masks hold it; the decode loop's
    # graphs, whose attention reads the cache as stored, need it spelled out (see runtime.cache_graph)
    native_windows: tuple[int, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-serializable dict of the fields (the cache policy only when it is not the default,
        so that artifacts without one read as before)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "cache_policy"
                and not (f.name in ("kv_heads", "native_windows") and getattr(self, f.name) is None)}
        policy = self.cache_policy.to_json()
        return {**data, "cache_policy": policy} if policy else data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "DecoderSpec":
        """The spec :meth:`to_json` wrote (artifacts written before cache policies existed have none)."""
        fields = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        for name in ("eos_token_id", "kv_heads", "native_windows"):  # JSON has no tuples
            if isinstance(fields.get(name), list):
                fields[name] = tuple(fields[name])
        fields["cache_policy"] = CachePolicy.from_json(data.get("cache_policy"))
        return cls(**fields)

    def with_policy(self, module: fx.GraphModule) -> "DecoderSpec":
        """This spec with the cache policy the passes recorded in ``module.meta`` (if any)."""
        recorded = module.meta.get(GRAPH_POLICY)
        if not recorded:
            return self
        merged = {**self.cache_policy.to_json(), **recorded}
        return dataclasses.replace(self, cache_policy=CachePolicy(**merged))

    def with_kv_heads_of(self, graph: Graph) -> "DecoderSpec":
        """This spec with each layer's KV heads as the step graph's cache inputs hold them (dimension 1
        of ``past_key_i``), None where every layer keeps ``num_kv_heads``."""
        inputs = {n.name: n.meta.get("val") for n in graph.inputs()}
        heads = tuple(int(inputs[f"past_key_{i}"].shape[1]) for i in range(self.num_layers))
        return dataclasses.replace(self, kv_heads=None if set(heads) == {self.num_kv_heads} else heads)

    def layer_kv_heads(self, layer: int) -> int:
        """KV heads of layer ``layer``'s cache."""
        return self.num_kv_heads if self.kv_heads is None else self.kv_heads[layer]

    @property
    def dtype(self) -> torch.dtype:
        """The cache's torch dtype (the model's weights' dtype)."""
        return getattr(torch, self.cache_dtype)

    def empty_cache(self, batch: int, length: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """Zeroed key and value tensors, interleaved per layer: k0, v0, k1, v1, ..."""
        return [torch.zeros((batch, self.layer_kv_heads(layer), length, self.head_dim), dtype=self.dtype,
                            device=device) for layer in range(self.num_layers) for _ in range(2)]


def is_causal_lm(model: Any) -> bool:
    """Whether ``model`` is a decoder-only language model bevel can capture with a KV cache: an HF
    model with a ``generate`` method and a config that is neither an encoder-decoder nor an encoder."""
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or config is None or not hasattr(model, "generate"):
        return False
    if getattr(config, "is_encoder_decoder", False):
        return False
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def text_config(model: torch.nn.Module) -> Any:
    """The config of an HF model's language part (a multimodal model nests it), or the config itself."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def uses_alibi(model: torch.nn.Module) -> bool:
    """Whether an HF causal LM adds ALiBi position biases (Bloom, MPT, Falcon with ``alibi=True``): its
    modelling module builds them with ``build_alibi_tensor``, unless its config turns them off."""
    module = sys.modules.get(type(model).__module__)
    return hasattr(module, "build_alibi_tensor") and bool(getattr(text_config(model), "alibi", True))


def decoder_spec(model: torch.nn.Module, max_cache_len: int | None = None) -> DecoderSpec:
    """The cache geometry of an HF causal LM, read from its config; ``max_cache_len`` defaults to
    the model's ``max_position_embeddings`` (or ``n_positions``)."""
    if not is_causal_lm(model):
        raise NotACausalLMError(f"{type(model).__name__} is not a causal language model (an HF '...ForCausalLM' or "
                                f"'...LMHeadModel' with generate()): decoder capture and generate() need one")
    text = text_config(model)
    if uses_alibi(model):
        raise CaptureError(f"{type(model).__name__} adds ALiBi position biases, which it builds from a [batch, "
                           f"tokens] attention mask, and bevel's decoder step hands a model its ready 4-D mask: "
                           f"ALiBi decoders cannot be compiled with a KV cache; compile with decoder=False to "
                           f"capture the forward as it is (without generate())")
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head")
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd")
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer")
    limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None) or 2048
    if max_cache_len is None:
        max_cache_len = int(limit)
    if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or not 2 <= max_cache_len:
        raise BevelError(f"max_cache_len={max_cache_len!r} must be an integer of at least 2 (tokens per sequence)")
    table = position_table_rows(model, int(limit))
    if table is not None and max_cache_len > table:
        raise BevelError(f"max_cache_len={max_cache_len} is beyond the {table} positions of {type(model).__name__}'s "
                         f"position embedding table; give at most {table}")
    eos = end_tokens(text.eos_token_id)
    first_eos = eos[0] if isinstance(eos, tuple) else eos
    pad = text.pad_token_id if isinstance(getattr(text, "pad_token_id", None), int) else (first_eos or 0)
    dtype = next(model.parameters()).dtype
    windows = tuple(native_windows(model, int(layers)))
    return DecoderSpec(num_layers=int(layers), num_kv_heads=int(kv_heads), head_dim=int(head_dim),
                       vocab_size=int(text.vocab_size), max_cache_len=max_cache_len, eos_token_id=eos,
                       pad_token_id=int(pad), cache_dtype=str(dtype).replace("torch.", ""), max_positions=table,
                       native_windows=windows if any(windows) else None)


def position_table_rows(model: torch.nn.Module, limit: int) -> int | None:
    """The positions an HF model's learned position embeddings cover (``limit``, its config's maximum),
    where it has such a table (GPT-2's ``wpe``, OPT's ``embed_positions`` with its offset of 2); None
    where positions are computed (rotary, ALiBi) and a token may sit at any position."""
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Embedding) and (last == "wpe" or "position" in last) \
                and module.num_embeddings in (limit, limit + 2):
            return limit
    return None


def end_tokens(eos: Any) -> int | tuple[int, ...] | None:
    """A config's ``eos_token_id`` as the spec keeps it: one id, a tuple of several (HF lists them
    where a model ends text with any), or None where it names none."""
    if isinstance(eos, (list, tuple)) and eos and all(is_token_id(i) for i in eos):
        return tuple(int(i) for i in eos) if len(eos) > 1 else int(eos[0])
    return int(eos) if is_token_id(eos) else None


def is_token_id(value: Any) -> bool:
    """Whether ``value`` can name a token: an int (not a bool) of at least 0."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def outside_vocabulary(ids: torch.Tensor, vocab_size: int) -> int | None:
    """An id of ``ids`` outside [0, vocab_size) (the lowest if one is negative, else the highest), or
    None: one device sync when every id is inside."""
    if not bool(((ids < 0) | (ids >= vocab_size)).any()):
        return None
    low = int(ids.min())
    return low if low < 0 else int(ids.max())


class StepCache:
    """An HF-style cache over explicit tensors: ``update`` writes the new keys and values at the
    step's slots (out of place, so the graph stays functional) and returns the whole layer cache."""

    is_compileable = True

    def __init__(self, cache: tuple[torch.Tensor, ...], slots: torch.Tensor) -> None:
        self.tensors = list(cache)
        self.slots = slots

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``keys`` and ``values`` of layer ``layer_idx`` at the step's slots; return the layer's cache."""
        k, v = 2 * layer_idx, 2 * layer_idx + 1
        self.tensors[k] = self.tensors[k].index_copy(2, self.slots, keys.to(self.tensors[k].dtype))
        self.tensors[v] = self.tensors[v].index_copy(2, self.slots, values.to(self.tensors[v].dtype))
        return self.tensors[k], self.tensors[v]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Unused: positions are always given, so HF never asks (0 keeps its defaults harmless)."""
        return 0  # positions are always given, so HF never needs it


def step_mask(position_ids: torch.Tensor, kv_positions: torch.Tensor) -> torch.Tensor:
    """The boolean attention mask [B, 1, T, L]: a query sees the slots holding a token of its own
    sequence at or before its position. A padding query (position 0) sees the sequence's first
    token, so no row is all masked (that would give NaN)."""
    keys = kv_positions[:, None, None, :]
    return (keys >= 0) & (keys <= position_ids[:, None, :, None])


def sliding_window(model: torch.nn.Module) -> tuple[int | None, tuple[str, ...] | None]:
    """The sliding window of an HF model's attention (None if it has none) and, where its config names
    each layer's kind (``layer_types``, as Qwen2 and Gemma do), those kinds. Without ``layer_types``
    every layer slides (Mistral, Phi-3, Starcoder2)."""
    text = text_config(model)
    window = getattr(text, "sliding_window", None)
    kinds = getattr(text, "layer_types", None)
    kinds = tuple(kinds) if kinds is not None else None
    slides = kinds is None or "sliding_attention" in kinds
    if not isinstance(window, int) or isinstance(window, bool) or not slides:
        return None, kinds
    others = sorted(set(kinds or ()) - {"full_attention", "sliding_attention"})
    if others:  # chunked or linear attention: a mask of its own that the step does not build
        raise CaptureError(f"{type(model).__name__} has layers of kind {', '.join(others)} beside its sliding "
                           f"window; the decoder step builds masks for full and sliding attention only")
    return window, kinds


def native_windows(model: torch.nn.Module, num_layers: int) -> list[int]:
    """Per layer, the window of the model's own sliding-window attention, 0 where a layer attends to
    every earlier token."""
    window, kinds = sliding_window(model)
    if window is None:
        return [0] * num_layers
    return [window if kinds is None or kinds[i] == "sliding_attention" else 0 for i in range(num_layers)]


def step_masks(position_ids: torch.Tensor, kv_positions: torch.Tensor, window: int | None,
               kinds: tuple[str, ...] | None) -> torch.Tensor | dict[str, torch.Tensor]:
    """The attention mask the model is called with: :func:`step_mask`, narrowed to the last ``window``
    positions (HF's sliding window: a key more than ``window - 1`` positions back is not seen) where the
    model slides; where its layers differ in kind, the mask of each kind by name, as HF takes them."""
    full = step_mask(position_ids, kv_positions)
    if window is None:
        return full
    sliding = full & (kv_positions[:, None, None, :] > position_ids[:, None, :, None] - window)
    return sliding if kinds is None else {"full_attention": full, "sliding_attention": sliding}


def additive_mask(model: torch.nn.Module) -> bool:
    """Whether the model's attention adds its 4-D mask to the scores (HF's "eager" attention) rather than
    reading it as booleans ("sdpa"); other attention kernels, which take no ready 4-D mask, are refused."""
    implementation = getattr(text_config(model), "_attn_implementation", None)
    if implementation in (None, "sdpa"):
        return False
    if implementation == "eager":
        return True
    raise CaptureError(f"{type(model).__name__} runs attn_implementation={implementation!r}, which takes no "
                       f"ready 4-D mask; load the model with attn_implementation='sdpa' (or 'eager') to compile it")


def as_additive(mask: torch.Tensor | dict[str, torch.Tensor],
                dtype: torch.dtype) -> torch.Tensor | dict[str, torch.Tensor]:
    """A boolean mask (or a dict of them) as the additive one eager attention takes: 0 where a query
    sees a key, the dtype's lowest value where it does not."""
    if isinstance(mask, dict):
        return {name: as_additive(value, dtype) for name, value in mask.items()}
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


class DecoderStep(torch.nn.Module):
    """An HF causal LM as the step function of the module docstring (what gets captured)."""

    def __init__(self, model: torch.nn.Module, spec: DecoderSpec) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        # the model's own mask would build the window in, but it is replaced by the step's mask
        self.window, self.layer_kinds = sliding_window(model)
        self.additive_mask = additive_mask(model)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache_position: torch.Tensor,
                kv_positions: torch.Tensor, *cache: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of the step's tokens and the cache with their keys and values written in."""
        steps = StepCache(cache, cache_position)
        mask = step_masks(position_ids, kv_positions, self.window, self.layer_kinds)
        if self.additive_mask:
            mask = as_additive(mask, self.model.dtype)
        out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=True,
                         **{_cache_argument(self.model): steps})
        logits = out.logits if hasattr(out, "logits") else out[0]
        return {"logits": logits, **dict(zip(cache_names(self.spec.num_layers, "present"), steps.tensors))}


def _cache_argument(model: torch.nn.Module) -> str:
    """The keyword a model's forward takes its cache by: ``cache`` from transformers 5 on, before it
    ``past_key_values`` (which transformers 5 still accepts, with a deprecation warning)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_names(num_layers: int, role: str = "past") -> list[str]:
    """``past_key_0, past_value_0, past_key_1, ...``: the cache inputs in order; with
    ``role="present"`` the names of the updated cache among the outputs."""
    return [f"{role}_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]


def cache_input_names(graph: Graph) -> frozenset[str]:
    """The KV cache inputs of a step graph (``past_key_i``, ``past_value_i``); none for another graph."""
    return frozenset(n.name for n in graph.inputs() if n.name.startswith(("past_key_", "past_value_")))


def left_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, mask)`` with each row's real tokens moved to its end (left padding), as a shared
    cache slot per step needs; rows already left-padded come back unchanged."""
    if attention_mask is None:
        return input_ids, torch.ones_like(input_ids, dtype=torch.bool)
    order = left_pad_order(attention_mask)
    return input_ids.gather(1, order), attention_mask.bool().gather(1, order)


def left_pad_order(attention_mask: torch.Tensor) -> torch.Tensor:
    """For each row, the column each left-padded position takes its token from: a stable sort on
    "is real" puts padding first and keeps the order of the real tokens."""
    return torch.sort(attention_mask.bool().to(torch.int8), dim=1, stable=True).indices


def prefill_inputs(spec: DecoderSpec, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   cache_len: int | None = None) -> tuple[torch.Tensor, ...]:
    """The step inputs of a prefill: left-padded prompts at slots 0..T-1 of an empty cache of
    ``cache_len`` slots (default: the prompt length)."""
    ids, mask = left_padded(input_ids, attention_mask)
    batch, length = ids.shape
    cache_len = length if cache_len is None else cache_len
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    kv_positions = torch.full((batch, cache_len), -1, dtype=torch.long, device=ids.device)
    kv_positions[:, :length] = torch.where(mask, positions, -1)
    slots = torch.arange(length, device=ids.device)
    return (ids, positions, slots, kv_positions, *spec.empty_cache(batch, cache_len, ids.device))


def capture_decoder(model: torch.nn.Module, spec: DecoderSpec, input_ids: torch.Tensor) -> Graph:
    """Capture ``model`` as the step graph (batch, tokens per step and cache length symbolic).

    ``input_ids`` only gives torch.export an example; rows and tokens are repeated when there is a
    single one, because an example size of 1 would fix that dimension.
    """
    if input_ids.dim() != 2:
        raise CaptureError(f"a decoder's example input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
    example = input_ids[:, :spec.max_cache_len - 2]
    if example.shape[0] < 2:
        example = example.repeat(2, 1)
    if example.shape[1] < 2:
        example = example.repeat(1, 2)
    args = prefill_inputs(spec, example, cache_len=example.shape[1] + 2)
    batch, tokens = torch.export.Dim("batch", min=1), torch.export.Dim("tokens", min=1)
    slots = torch.export.Dim("cache_len", min=2)
    cache_shape = {0: batch, 2: slots}
    dynamic = ({0: batch, 1: tokens}, {0: batch, 1: tokens}, {0: tokens}, {0: batch, 1: slots},
               tuple(cache_shape for _ in range(2 * spec.num_layers)))
    graph = capture(DecoderStep(model, spec), args, dynamic_shapes=dynamic, defer_guards=True)
    name_inputs(graph.module, list(STEP_INPUTS) + cache_names(spec.num_layers))
    mark_native_windows(graph.module, spec)
    return graph


def mark_native_windows(module: fx.GraphModule, spec: DecoderSpec) -> None:
    """Note ``spec.native_windows`` in a step graph's meta, where :func:`bevel.ir.attention.decoder_attention`
    reads them (a loaded step graph has no such meta of its own)."""
    module.meta[NATIVE_WINDOWS] = list(spec.native_windows or [0] * spec.num_layers)


def name_inputs(module: fx.GraphModule, names: list[str]) -> None:
    """Give the step graph's placeholders their names (they become the ONNX input names)."""
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(names):
        raise CaptureError(f"the decoder step graph has {len(placeholders)} inputs, expected {len(names)}")
    for node, name in zip(placeholders, names):
        if node.name != name:
            node._rename(name)
            node.target = node.name  # a placeholder's target is its argument name in the code
    codegen = module.graph._codegen
    if getattr(codegen, "pytree_info", None) is not None:  # the names forward() is written with
        codegen.pytree_info = codegen.pytree_info._replace(orig_args=list(names))
    module.recompile()


def attention_targets() -> tuple[Any, ...]:
    """The ops an attention site may be: SDPA as captured, or the bevel ops attention passes put there."""
    import bevel.runtime.ops  # noqa: F401  (registers torch.ops.bevel.*)

    return (torch.ops.aten.scaled_dot_product_attention.default, torch.ops.bevel.sparse_attention.default,
            torch.ops.bevel.cache_attention.default)


@dataclass
class AttentionSite:
    """One layer's attention in a step graph: the attention node and the cache it reads and writes."""

    layer: int
    attention: fx.Node       # aten.scaled_dot_product_attention (or a bevel attention op, after a pass)
    key_cache: fx.Node       # the placeholder of the incoming keys
    value_cache: fx.Node
    key_write: fx.Node       # the index_copy that writes the step's keys into it
    value_write: fx.Node


def attention_sites(graph: Graph) -> list[AttentionSite]:
    """Per layer, the attention node of a step graph and its cache (see the module docstring);
    each attention node is tagged ``meta["bevel_attention"] = {"layer": i}``. Layers a pass removed
    (their cache is passed through unwritten) have no site."""
    placeholders = {n.name: n for n in graph.inputs()}
    targets = attention_targets()
    order = {n: i for i, n in enumerate(graph.fx_graph.nodes)}
    sites = []
    layer_count = sum(1 for name in placeholders if name.startswith("past_key_"))
    for layer in range(layer_count):
        key_cache, value_cache = placeholders[f"past_key_{layer}"], placeholders[f"past_value_{layer}"]
        writes = [[u for u in cache.users if u.target == torch.ops.aten.index_copy.default and u.args[0] is cache]
                  for cache in (key_cache, value_cache)]
        if writes == [[], []]:
            continue  # a layer a pass removed: its cache passes through unread
        if [len(w) for w in writes] != [1, 1]:
            raise BevelError(f"the step graph's cache of layer {layer} is not written by one index_copy per tensor")
        key_write, value_write = writes[0][0], writes[1][0]
        readers = [n for n in descendants(key_write) if n.target in targets]
        if not readers:
            raise BevelError(f"no scaled_dot_product_attention (or bevel attention op) reads {key_cache.name} in the "
                             f"step graph: the model writes its attention out as matrix products and a softmax (HF's "
                             f"attn_implementation=\"eager\"; Gemma 2's default, as it caps its scores with tanh), "
                             f"which the attention and KV-cache passes do not rewrite; loaded with "
                             f"attn_implementation=\"sdpa\", a model has one attention op per layer")
        attention = min(readers, key=order.__getitem__)  # later layers' attention reads it too
        attention.meta["bevel_attention"] = {"layer": layer}
        sites.append(AttentionSite(layer, attention, key_cache, value_cache, key_write, value_write))
    return sites
