"""``CompiledDecoder``: a compiled causal LM, with ``generate()`` running prefill then decode steps
over a preallocated KV cache (see :mod:`bevel.ir.decoder` for the step graph)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from bevel.compiler.report import Report
from bevel.errors import GenerateError
from bevel.ir.decoder import (CachePolicy, DecoderSpec, cache_names, is_token_id, left_pad_order,
                              mark_native_windows, outside_vocabulary)
from bevel.runtime.cache_graph import params_names, storage_graph
from bevel.runtime.compiled_module import CompiledModule, on_cpu
from bevel.runtime.early_exit import EarlyExitRunner, early_exit_state, has_early_exit
from bevel.runtime.kv_cache import DecodeStream


MODEL_EOS = object()  # generate's default end-of-text token: the one the model's config names


aten = torch.ops.aten
_SHAPE_READERS = (aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default)
# checks torch.export leaves in the graph: the decode loop builds every input itself, and one Python
# call per check at every token is time the step does not need
_CHECKS = (aten._assert_tensor_metadata.default, aten._assert_scalar.default,
           aten.sym_constrain_range_for_size.default)


def runtime_graph(step: fx.GraphModule, num_layers: int, policy: CachePolicy | None = None) -> fx.GraphModule:
    """A copy of the step graph for the decode loop, sharing its weights: the cache kept as ``policy``
    says (``bevel.runtime.cache_graph``; None: every token in float), the new keys and values written
    into the cache tensors it is given instead of returning updated copies (copying every layer's
    whole cache at each token would cost more than the token), without torch.export's input guards
    and tensor checks, taking and returning flat tensors: ``(logits, present_key_0, ...)``. A graph
    without a cache (``num_layers=0``) only loses its guards and takes flat inputs."""
    kept = storage_graph(step, num_layers, policy or CachePolicy())
    graph = kept.graph
    for node in list(graph.nodes):
        if node.target in _CHECKS or (node.op == "call_module" and node.target == "_guards_fn"):
            graph.erase_node(node)
    names = set(cache_names(num_layers)) | set(params_names(num_layers))
    for node in graph.nodes:
        readers = [u for u in node.users if u.target not in _SHAPE_READERS]  # size queries may share it
        if node.op == "placeholder" and node.name in names and len(readers) == 1:
            (user,) = readers
            if user.target == aten.index_copy.default and user.args[0] is node:
                user.target = aten.index_copy_.default
    graph._codegen = fx.graph.CodeGen()  # plain positional inputs and a tuple of outputs, no pytree
    return fx.GraphModule(step, graph)


class CompiledDecoder(CompiledModule):
    """A compiled decoder LM.

    ``cm(input_ids, attention_mask=None)`` returns the logits [batch, tokens, vocab], as the model's
    ``.logits``; ``cm.generate(input_ids, max_new_tokens)`` decodes. ``cm.step(*inputs)`` runs the
    captured step graph itself (prefill or decode, see :mod:`bevel.ir.decoder`). ``prefill_graph``
    and ``decode_graph`` are the two graphs generate runs (see :func:`runtime_graph`); they share
    the weights, write the cache in place and return ``(logits, present_key_0, ...)``. ``spec``
    holds the cache geometry and how the loop keeps the cache (its ``cache_policy``, which the
    attention and KV-cache passes set); ``stream`` runs the loop one token at a time. On the CPU
    each graph's float32 linears run on the library timed faster at its rows (``cpu_linears``, see
    :mod:`bevel.codegen.cpu_linear`): a decode step multiplies one token per sequence. After
    ``layer_skip.early_exit`` both run block by block (:class:`~bevel.runtime.early_exit.EarlyExitRunner`),
    and ``early_exit`` counts the depth of the tokens they ran (``early_exit.average_depth``,
    ``early_exit.reset()``); otherwise it is None.
    """

    _runs_early_exit_here = False  # the prefill and decode graphs below do

    def __init__(self, graph_module: fx.GraphModule, example_inputs: tuple[Any, ...], report: Report,
                 pipeline: str, spec: DecoderSpec, cpu_linear_kernels: dict[tuple[int, int, int], str] | None = None
                 ) -> None:
        super().__init__(graph_module, example_inputs, report, pipeline, cpu_linear_kernels)
        self.spec = spec.with_policy(graph_module)
        mark_native_windows(graph_module, self.spec)  # a loaded step graph has only the spec's
        if has_early_exit(graph_module):
            self.early_exit = early_exit_state(graph_module)
        self._build_runners()

    def _build_runners(self) -> None:
        """Make the prefill and decode graphs for the weights where they are now. On the CPU the
        linears of each run on the library timed faster at its rows: a decode step multiplies one token
        per sequence (the example's batch), a prefill the example's prompts. After
        ``layer_skip.early_exit`` exited rows skip the blocks after their exit (same outputs)."""
        kernels, policy = self._cpu_linear_kernels, self.spec.cache_policy
        self.prefill_graph, prefill = on_cpu(runtime_graph(self.graph_module, self.spec.num_layers, policy), kernels)
        self.decode_graph, decode = on_cpu(runtime_graph(self.graph_module, self.spec.num_layers, policy), kernels,
                                           rows=self.example_inputs[0].shape[0])
        self.cpu_linears = list({c.key: c for c in prefill + decode}.values())
        self._keep_kernels()
        if self.early_exit is not None:
            self.prefill_graph = EarlyExitRunner(self.prefill_graph, self.early_exit, decode=False)
            self.decode_graph = EarlyExitRunner(self.decode_graph, self.early_exit, decode=True)

    @property
    def device(self) -> torch.device:
        """Where the weights live (inputs are moved there)."""
        tensors = list(self.graph_module.parameters()) + list(self.graph_module.buffers())
        return tensors[0].device if tensors else torch.device("cpu")

    def step(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """One step of the captured graph (functional: the cache inputs are left untouched)."""
        with torch.no_grad():
            return self.graph_module(*inputs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of every token of the prompts (a prefill into a fresh cache), in the input's order."""
        ids = self._check_ids(input_ids)
        mask = None if attention_mask is None else attention_mask.to(ids.device)
        with torch.no_grad():
            stream = DecodeStream(self.spec, self.prefill_graph, self.decode_graph, ids, mask, max_new_tokens=0)
            stream.prefill()
            logits = stream.logits
        if attention_mask is None:
            return logits
        # the prefill ran on left-padded rows: put each token's logits back where it was
        order = left_pad_order(attention_mask.to(ids.device))
        return torch.empty_like(logits).scatter_(1, order.unsqueeze(-1).expand_as(logits), logits)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, attention_mask: torch.Tensor | None = None,
                 temperature: float = 0.0, top_k: int | None = None, eos_token_id: Any = MODEL_EOS,
                 seed: int | None = None) -> torch.Tensor:
        """Continue each prompt by up to ``max_new_tokens`` tokens; returns [batch, prompt + new].

        Prompts of different lengths come padded with ``attention_mask`` (1 = real token); they are
        left-padded in the result, as HF returns them. ``temperature=0`` decodes greedily; above 0
        it samples from the softmax of logits/temperature, restricted to the ``top_k`` most likely
        tokens if given (``seed`` makes sampling reproducible). A row that emits ``eos_token_id``
        (a token id or a list of them; default: the model's; None never stops) is finished and
        padded with the pad token; the loop stops when every row is.
        """
        ids = self._check_ids(input_ids)
        self._check_settings(max_new_tokens, temperature, top_k)
        eos = self._end_tokens(self.spec.eos_token_id if eos_token_id is MODEL_EOS else eos_token_id, ids.device)
        mask = None if attention_mask is None else attention_mask.to(ids.device)
        if mask is not None and (mask.shape != ids.shape or not bool(mask.bool().any(dim=1).all())):
            raise GenerateError(f"attention_mask must have the prompts' shape {tuple(ids.shape)} and mark at least "
                                f"one real token per row")
        generator = None if seed is None else torch.Generator(device=ids.device).manual_seed(seed)
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        new_tokens = []
        with torch.no_grad():
            stream = self.stream(ids, max_new_tokens, mask)
            logits = stream.prefill()
            for index in range(max_new_tokens):
                token = self._pick(logits, temperature, top_k, generator)
                token = torch.where(finished, torch.full_like(token, self.spec.pad_token_id), token)
                new_tokens.append(token)
                if eos is not None:
                    finished |= torch.isin(token, eos)
                if index == max_new_tokens - 1 or bool(finished.all()):
                    break
                logits = stream.step(token)
        return torch.cat([stream.prompt, torch.stack(new_tokens, dim=1)], dim=1)

    def stream(self, input_ids: torch.Tensor, max_new_tokens: int,
               attention_mask: torch.Tensor | None = None) -> DecodeStream:
        """A decode loop for up to ``max_new_tokens`` tokens after the prompts, driven by the caller:
        ``logits = s.prefill()``, then ``logits = s.step(token)`` per token (what ``generate`` runs,
        and what scoring a text token by token through the cache needs). The cache is allocated here,
        as the cache policy says; the prompt must fit ``max_cache_len``, and so must prompt plus new
        tokens unless the policy bounds the cache (a ring buffer or eviction)."""
        ids = self._check_ids(input_ids)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise GenerateError(f"max_new_tokens={max_new_tokens!r} must be an integer of at least 0")
        mask = None if attention_mask is None else attention_mask.to(ids.device)
        prompt_len, limit = ids.shape[1], self.spec.max_cache_len
        total = prompt_len + max_new_tokens
        policy = self.spec.cache_policy
        bounded = policy.window is not None or policy.budget is not None
        if prompt_len > limit:
            raise GenerateError(f"the prompt ({prompt_len} tokens) does not fit the KV cache of {limit} tokens per "
                                f"sequence; shorten it or compile with a larger max_cache_len")
        if total > limit and not bounded:
            raise GenerateError(f"the prompt plus max_new_tokens ({prompt_len} + {max_new_tokens} = {total} "
                                f"tokens) does not fit the KV cache of {limit} tokens per sequence; ask for at most "
                                f"{limit - prompt_len} new tokens or compile with a larger max_cache_len")
        table = self.spec.max_positions
        if table is not None and total > table:  # a bounded cache still counts positions up
            raise GenerateError(f"the prompt plus max_new_tokens ({prompt_len} + {max_new_tokens} = {total} tokens) "
                                f"goes past the model's {table} positions (a table of position embeddings); ask "
                                f"for at most {table - prompt_len} new tokens")
        return DecodeStream(self.spec, self.prefill_graph, self.decode_graph, ids, mask, max_new_tokens)

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_k: int | None,
              generator: torch.Generator | None) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(dim=-1)
        scores = logits.float() / temperature
        if top_k is not None and top_k < scores.shape[-1]:
            threshold = scores.topk(top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < threshold, float("-inf"))
        return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)

    def _check_ids(self, input_ids: Any) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype in (torch.float16, torch.bfloat16,
                                                                             torch.float32, torch.float64):
            raise GenerateError(f"input_ids must be an integer tensor of token ids, got {type(input_ids).__name__}"
                                f"{'' if not isinstance(input_ids, torch.Tensor) else ' ' + str(input_ids.dtype)}")
        ids = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
        if ids.dim() != 2:
            raise GenerateError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        if ids.numel() == 0:
            raise GenerateError(f"the prompt is empty (input_ids of shape {tuple(ids.shape)}): give at least one token "
                                f"per sequence")
        outside = outside_vocabulary(ids, self.spec.vocab_size)
        if outside is not None:
            raise GenerateError(f"input_ids hold token {outside}, outside the vocabulary [0, {self.spec.vocab_size})")
        return ids.to(self.device).long()

    @staticmethod
    def _check_settings(max_new_tokens: Any, temperature: Any, top_k: Any) -> None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise GenerateError(f"max_new_tokens={max_new_tokens!r} must be an integer of at least 1")
        if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                or not 0 <= temperature < math.inf):  # NaN fails the comparison too
            raise GenerateError(f"temperature={temperature!r} must be a finite number >= 0 (0 decodes greedily)")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise GenerateError(f"top_k={top_k!r} must be None or an integer of at least 1")

    @staticmethod
    def _end_tokens(eos: Any, device: torch.device) -> torch.Tensor | None:
        """``eos_token_id`` (None, an id, or a list or tuple of ids) as a tensor of ids, checked."""
        if eos is None:
            return None
        ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        if not ids or not all(map(is_token_id, ids)):
            raise GenerateError(f"eos_token_id={eos!r} must be None, a token id or a list of token ids (integers "
                                f">= 0)")
        return torch.tensor(ids, device=device)

    def manifest_extra(self) -> dict[str, Any]:
        """What an artifact needs beyond the graph to rebuild this: the cache geometry."""
        return {**super().manifest_extra(), "decoder": self.spec.to_json()}
