"""The decode loop's KV cache: allocation, the slots each step writes, and what a ``CachePolicy`` keeps.

A :class:`DecodeStream` runs one generation: :meth:`~DecodeStream.prefill` then one
:meth:`~DecodeStream.step` per token, over the runtime graphs of ``bevel.runtime.cache_graph``. Slots
are shared by the batch (prompts are left-padded), positions are per sequence (``kv_positions``).
Three ways to keep the cache, chosen by the policy and the lengths:

- every token (no policy, or when prompt + new tokens fit the policy's slots anyway): the prompt at
  slots 0..T-1, the n-th new token at slot T + n; each step attends over the slots filled so far;
- a ring buffer (``attention.window``): ``sinks + window`` slots. After the prefill (into T slots of
  its own), each sequence's first ``sinks`` positions go to slots 0..sinks-1 and the last ``window``
  tokens to the ring: token ``s`` of the padded stream lives at slot ``sinks + s % window``, so a new
  token overwrites the one ``window`` before it. A new token at a position below ``sinks`` (a prompt
  shorter than the sinks) is copied to its sink slot after its step;
- eviction (``kv.evict``): ``budget`` slots plus one where each new token is written. After every
  step each layer and KV head adds the attention its slots received to their scores, and the new
  entry moves into the slot of the entry with the lowest score among those older than the newest
  ``recent`` (an empty slot first); the prefill's attention gives the first scores, and the prompt
  is cut to the budget the same way.

Memory is allocated once per generation: with a policy, its size does not depend on how many tokens
are generated (:attr:`DecodeStream.cache_bytes`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from bevel.errors import GenerateError
from bevel.ir.decoder import CachePolicy, DecoderSpec, outside_vocabulary, prefill_inputs
from bevel.runtime.cache_graph import StorageLayout
from bevel.runtime.ops.kv_quant import code_width, params_per_group

Runner = Callable[..., Any]


def budget_slots(policy: CachePolicy, spec: DecoderSpec) -> int:
    """Entries ``kv.evict`` keeps: its count, or its share of ``max_cache_len``."""
    budget = policy.budget
    return budget if isinstance(budget, int) else max(2, math.ceil(budget * spec.max_cache_len))


class CacheTensors:
    """Every tensor of a cache with ``length`` slots (slot dimension 2, batch first), in the order the
    runtime graphs take them: keys and values, then group parameters, then per-layer positions;
    ``scores`` (eviction) is the loop's own and no graph input."""

    def __init__(self, spec: DecoderSpec, batch: int, length: int, device: torch.device) -> None:
        policy = spec.cache_policy
        layout = StorageLayout.of(policy)
        # per layer: a pruned layer may keep fewer KV heads than another
        shapes = [(batch, spec.layer_kv_heads(layer), length) for layer in range(spec.num_layers)]
        dim = spec.head_dim
        if layout.quantized:
            group = policy.group_size or dim
            dtype = torch.int8 if policy.bits == 8 else torch.uint8
            self.kv = [torch.zeros((*shape, code_width(dim, policy.bits)), dtype=dtype, device=device)
                       for shape in shapes for _ in range(2)]
            self.params = [torch.zeros((*shape, dim // group, params_per_group(policy.bits)), device=device)
                           for shape in shapes for _ in range(2)]
        else:
            self.kv = spec.empty_cache(batch, length, device)
            self.params = []
        self.positions = ([torch.full(shape, -1, dtype=torch.long, device=device) for shape in shapes]
                          if layout.per_layer_positions else [])
        self.scores = [torch.zeros(p.shape, device=device) for p in self.positions]

    def stored(self) -> list[torch.Tensor]:
        """The tensors a step writes into (keys, values and parameters)."""
        return self.kv + self.params

    def all(self) -> list[torch.Tensor]:
        """Every tensor with a slot dimension, graph inputs first."""
        return self.kv + self.params + self.positions + self.scores

    def inputs(self, length: int | None = None) -> list[torch.Tensor]:
        """The graph inputs, as views of the first ``length`` slots (all when None)."""
        tensors = self.kv + self.params + self.positions
        return tensors if length is None else [t[:, :, :length] for t in tensors]

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache (keys, values, parameters, positions and scores)."""
        return sum(t.numel() * t.element_size() for t in self.all())


def _gather_slots(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor`` [B, H, L, ...] at slots ``index`` [B, L'] or [B, H, L'] along dimension 2."""
    if index.dim() == 2:
        index = index[:, None].expand(tensor.shape[0], tensor.shape[1], index.shape[-1])
    index = index.reshape(*index.shape, *([1] * (tensor.dim() - 3))).expand(*index.shape, *tensor.shape[3:])
    return tensor.gather(2, index)


class DecodeStream:
    """One generation over a compiled decoder (see the module docstring)."""

    def __init__(self, spec: DecoderSpec, prefill_graph: Runner, decode_graph: Runner, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None, max_new_tokens: int) -> None:
        self.spec, self.policy = spec, spec.cache_policy
        self.prefill_graph, self.decode_graph = prefill_graph, decode_graph
        self.device = input_ids.device
        prompt, positions, slots, kv_positions = prefill_inputs(spec, input_ids, attention_mask)[:4]
        self.prompt, self.prompt_positions, self.prompt_slots = prompt, positions, slots
        self.batch, self.length = prompt.shape
        self.max_new_tokens, self.steps, self.prefilled = max_new_tokens, 0, False
        total = self.length + max_new_tokens
        self.mode = "every"  # also for a prefill alone (no token follows: nothing to keep short)
        if max_new_tokens == 0:
            pass
        elif self.policy.window is not None and total > self.policy.window + self.policy.sinks:
            self.mode = "ring"
        elif self.policy.budget is not None and total > budget_slots(self.policy, spec) + 1:
            self.mode = "evict"
        # every token: one allocation for the whole generation; otherwise the prompt's own, then compacted
        self.cache = CacheTensors(spec, self.batch, total if self.mode == "every" else self.length, self.device)
        self.kv_positions = torch.full((self.batch, self.cache.kv[0].shape[2]), -1, dtype=torch.long,
                                       device=self.device)
        self.kv_positions[:, :self.length] = kv_positions
        for own in self.cache.positions:
            own[:, :, :self.length] = kv_positions[:, None]
        self.position = positions[:, -1]
        self.stream = self.length  # padded tokens written so far (shared by the batch)
        self.peak_bytes = self.cache.nbytes

    @property
    def cache_bytes(self) -> int:
        """Bytes the cache holds now (after the prefill: the size it keeps for the whole generation)."""
        return self.cache.nbytes

    def prefill(self) -> torch.Tensor:
        """Run the prompts; the logits of each one's last token [B, V] (all of them in ``logits``)."""
        if self.prefilled:
            raise GenerateError("prefill() already ran on this stream; open a new stream for other prompts")
        self.prefilled = True
        out = self._run(self.prefill_graph, self.prompt, self.prompt_positions, self.prompt_slots, self.length)
        self.logits = out[0]
        if self.mode == "ring":
            self._to_ring()
        elif self.mode == "evict":
            self._to_budget(out)
        return out[0][:, -1]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence [B]; the logits that follow it [B, V]."""
        self._check_step(token)
        self.steps += 1
        self.position = self.position + 1
        slot, length = self._next_slot()
        self.kv_positions[:, slot] = self.position
        for own in self.cache.positions:
            own[:, :, slot] = self.position[:, None]
        out = self._run(self.decode_graph, token.unsqueeze(1), self.position.unsqueeze(1),
                        torch.tensor([slot], device=self.device), length)
        self.stream += 1
        if self.mode == "ring":
            self._keep_sinks(slot)
        elif self.mode == "evict":
            self._evict(out)
        return out[0][:, -1]

    def _check_step(self, token: Any) -> None:
        """Refuse a step the stream cannot take: before the prefill, past the tokens its cache was
        made for, or a token that is not one id per sequence in the vocabulary."""
        if not self.prefilled:
            raise GenerateError("step() before prefill(): run the prompts with stream.prefill() first")
        if self.steps == self.max_new_tokens:
            raise GenerateError(f"this stream was opened for {self.max_new_tokens} new tokens and all were fed; open "
                                f"one with a larger max_new_tokens")
        if (not isinstance(token, torch.Tensor) or token.is_floating_point() or token.is_complex()
                or tuple(token.shape) != (self.batch,)):
            got = (f"{token.dtype} of shape {tuple(token.shape)}" if isinstance(token, torch.Tensor)
                   else type(token).__name__)
            raise GenerateError(f"step() takes one token id per sequence, an integer tensor of shape ({self.batch},); "
                                f"got {got}")
        outside = outside_vocabulary(token, self.spec.vocab_size)
        if outside is not None:
            raise GenerateError(f"step() was given token {outside}, outside the vocabulary [0, {self.spec.vocab_size})")

    # -- running -----------------------------------------------------------------------------------

    def _run(self, graph: Runner, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
             length: int) -> tuple[Any, ...]:
        views = self.cache.inputs(length)
        out = graph(ids, positions, slots, self.kv_positions[:, :length], *views)
        stored = len(self.cache.stored())
        # a write that stayed functional returned a new tensor: copy it into the cache
        for view, value in zip(views[:stored], out[1:1 + stored]):
            if value.data_ptr() != view.data_ptr():
                view.copy_(value)
        return out

    def _next_slot(self) -> tuple[int, int]:
        """The slot the next token goes to and how many slots the step attends over."""
        if self.mode == "every":
            return self.stream, self.stream + 1
        if self.mode == "ring":
            sinks, window = self.policy.sinks, self.policy.window
            return sinks + self.stream % window, sinks + window
        staging = self.cache.kv[0].shape[2] - 1
        return staging, staging + 1

    # -- ring buffer -------------------------------------------------------------------------------

    def _to_ring(self) -> None:
        """Move the prompt into ``sinks + window`` slots (see the module docstring)."""
        sinks, window = self.policy.sinks, self.policy.window
        length, kv_positions = self.length, self.kv_positions
        source = torch.zeros(self.batch, sinks + window, dtype=torch.long, device=self.device)
        kept = torch.full_like(source, -1)
        if sinks:
            holds = kv_positions[:, :, None] == torch.arange(sinks, device=self.device)  # [B, T, sinks]
            source[:, :sinks] = holds.long().argmax(1)
            kept[:, :sinks] = torch.where(holds.any(1), torch.arange(sinks, device=self.device), -1)
        stream = torch.arange(max(0, length - window), length, device=self.device)
        ring = sinks + stream % window
        source[:, ring] = stream
        kept[:, ring] = torch.where(kv_positions[:, stream] >= sinks, kv_positions[:, stream], -1)
        self._replace(source, kept)

    def _keep_sinks(self, slot: int) -> None:
        """A token at a position below ``sinks`` is copied from the ring to its sink slot."""
        for row in (self.position < self.policy.sinks).nonzero().flatten().tolist():
            target = int(self.position[row])
            for tensor in self.cache.stored():
                tensor[row, :, target] = tensor[row, :, slot]
            self.kv_positions[row, target] = target
            self.kv_positions[row, slot] = -1

    def _replace(self, source: torch.Tensor, kept: torch.Tensor) -> None:
        """A new cache of ``source.shape[-1]`` slots holding the prompt's slots ``source`` [B, S] (or per
        KV head [B, H, S]) at positions ``kept`` (-1: empty)."""
        old = self.cache
        self.cache = CacheTensors(self.spec, self.batch, source.shape[-1], self.device)
        for new, tensor in zip(self.cache.stored(), old.stored()):
            new.copy_(_gather_slots(tensor, source))
        for new, scores in zip(self.cache.scores, old.scores):
            new.copy_(_gather_slots(scores, source))
        self.kv_positions = kept if kept.dim() == 2 else kept[:, 0]
        for own in self.cache.positions:
            own.copy_(kept if kept.dim() == 3 else kept[:, None].expand_as(own))
        self.peak_bytes = max(self.peak_bytes, old.nbytes + self.cache.nbytes)

    # -- eviction ----------------------------------------------------------------------------------

    def _recent(self) -> int:
        return round(self.policy.recent * budget_slots(self.policy, self.spec))

    def _to_budget(self, out: tuple[Any, ...]) -> None:
        """Cut the prompt to the budget per layer and KV head: the newest, then the best scored."""
        budget = budget_slots(self.policy, self.spec)
        masses = out[1 + len(self.cache.stored()):]
        layers = []
        for own, scores, mass in zip(self.cache.positions, self.cache.scores, masses):
            if mass is not None:
                scores += mass
            newest = own >= (self.position[:, None, None] - self._recent() + 1)
            priority = torch.where(own < 0, -torch.inf, torch.where(newest, torch.inf, scores))
            keep = priority.topk(min(budget, priority.shape[-1]), dim=-1).indices.sort(dim=-1).values
            layers.append(keep)
        # one more slot than the budget: where each new token is written before the eviction
        extra = budget + 1 - layers[0].shape[-1]
        old = self.cache
        self.cache = CacheTensors(self.spec, self.batch, budget + 1, self.device)
        self.kv_positions = torch.full((self.batch, budget + 1), -1, dtype=torch.long, device=self.device)
        for layer, keep in enumerate(layers):
            kept_positions = old.positions[layer].gather(2, keep)
            pad = torch.full((*keep.shape[:2], extra), -1, dtype=torch.long, device=self.device)
            self.cache.positions[layer].copy_(torch.cat([kept_positions, pad], dim=2))
            self.cache.scores[layer][:, :, :keep.shape[-1]] = old.scores[layer].gather(2, keep)
            for kind in range(2):
                index = 2 * layer + kind
                self.cache.kv[index][:, :, :keep.shape[-1]] = _gather_slots(old.kv[index], keep)
                if old.params:
                    self.cache.params[index][:, :, :keep.shape[-1]] = _gather_slots(old.params[index], keep)
        self.peak_bytes = max(self.peak_bytes, old.nbytes + self.cache.nbytes)

    def _evict(self, out: tuple[Any, ...]) -> None:
        """Add the step's attention to the scores; move the new entry into the least scored older one."""
        staging = self.cache.kv[0].shape[2] - 1
        masses = out[1 + len(self.cache.stored()):]
        oldest_kept = self.position[:, None, None] - self._recent() + 1
        for layer, (own, scores, mass) in enumerate(zip(self.cache.positions, self.cache.scores, masses)):
            if mass is not None:
                scores += mass
            candidate = torch.where(own < 0, -torch.inf, torch.where(own >= oldest_kept, torch.inf, scores))
            victim = candidate.argmin(dim=-1, keepdim=True)  # [B, H, 1]
            tensors = [self.cache.kv[2 * layer], self.cache.kv[2 * layer + 1]]
            if self.cache.params:
                tensors += [self.cache.params[2 * layer], self.cache.params[2 * layer + 1]]
            for tensor in tensors + [own, scores]:
                new = tensor[:, :, staging:staging + 1].clone()  # scatter_ may not read what it writes
                tensor.scatter_(2, victim.reshape(*victim.shape, *([1] * (tensor.dim() - 3))).expand_as(new), new)
            own[:, :, staging] = -1
            scores[:, :, staging] = 0
        self.kv_positions[:, staging] = -1
