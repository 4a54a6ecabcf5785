"""Autotuning for bevel's matmul kernels: configs filtered by the device's shared memory, and a launcher
that skips benchmarking under the Triton interpreter.

Triton's autotuner times every config with CUDA events, which the interpreter (``TRITON_INTERPRET=1``,
CPU tensors) cannot do; there :class:`TunedKernel` runs the first config its pruner keeps instead.
Tests so go through the same pruning code as a GPU; only the shared-memory filter, which needs a
CUDA device, and the timing are skipped.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import triton

try:  # where Triton keeps it from 3.0 on; an import failure only means kernels are never interpreted
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover
    InterpretedFunction = ()  # type: ignore[assignment,misc]

# configs -> named kernel arguments -> the configs worth timing (Triton's ``early_config_prune``)
Pruner = Callable[..., list[triton.Config]]


def matmul_config(block_m: int, block_n: int, block_k: int, warps: int, stages: int,
                  group_m: int = 8) -> triton.Config:
    """One tile configuration of the tiled matmul kernels (BLOCK_M x BLOCK_N outputs, BLOCK_K deep,
    GROUP_M row tiles per column sweep)."""
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


def shared_memory_bytes(config: triton.Config, act_bytes: float, weight_bytes: float,
                        converted_bytes: float = 0) -> int:
    """Roughly the shared memory a matmul config needs: an activation tile [BLOCK_M, BLOCK_K] and a
    weight tile [BLOCK_N, BLOCK_K] per pipeline stage (``weight_bytes`` 0.5 for packed int4), plus,
    for weights converted in registers before ``tl.dot`` (``converted_bytes`` per element), the one
    converted tile the dot reads from shared memory.

    Compiled for sm_90, bevel's kernels used 0.5x to 1x of this with 16-bit activations and up to
    1.4x with float32 ones (TF32x3 splits both operands); a config that overshoots the device fails
    to compile, and Triton's autotuner then skips it rather than failing the call.
    """
    block = config.kwargs
    per_stage = block["BLOCK_M"] * block["BLOCK_K"] * act_bytes + block["BLOCK_N"] * block["BLOCK_K"] * weight_bytes
    converted = block["BLOCK_N"] * block["BLOCK_K"] * converted_bytes
    return math.ceil(per_stage * max(config.num_stages, 1) + converted)


def fitting_configs(configs: Sequence[triton.Config], max_shared: int, act_bytes: float,
                    weight_bytes: float, converted_bytes: float = 0) -> list[triton.Config]:
    """The configs whose tiles fit ``max_shared`` bytes of shared memory, in their order; when none
    does, the smallest one alone (the autotuner needs one, and Triton's own error then says why)."""
    def need(c: triton.Config) -> int:
        return shared_memory_bytes(c, act_bytes, weight_bytes, converted_bytes)

    fit = [c for c in configs if need(c) <= max_shared]
    return fit if fit else [min(configs, key=need)]


@functools.cache
def device_shared_memory(index: int) -> int:
    """Bytes of shared memory one program may use on CUDA device ``index``."""
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def configs_fitting_device(configs: Sequence[triton.Config], tensor: torch.Tensor, act_bytes: float,
                           weight_bytes: float, converted_bytes: float = 0) -> list[triton.Config]:
    """:func:`fitting_configs` for the device ``tensor`` lives on; every config off CUDA (interpreter)."""
    if tensor.device.type != "cuda":
        return list(configs)
    index = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
    return fitting_configs(configs, device_shared_memory(index), act_bytes, weight_bytes, converted_bytes)


def with_block_k(configs: Iterable[triton.Config], block_k: Callable[[int], int]) -> list[triton.Config]:
    """The configs with ``BLOCK_K`` replaced by ``block_k(BLOCK_K)``, duplicates dropped, order kept."""
    seen, out = set(), []
    for c in configs:
        kwargs = {**c.kwargs, "BLOCK_K": block_k(c.kwargs["BLOCK_K"])}
        ident = (tuple(sorted(kwargs.items())), c.num_warps, c.num_stages)
        if ident not in seen:
            seen.add(ident)
            out.append(triton.Config(kwargs, num_warps=c.num_warps, num_stages=c.num_stages))
    return out


# bytes written before each timed call so that its operands come from DRAM (more than any GPU's L2)
FLUSH_BYTES = 256 * 2**20


def cold_cache_bench(fn: Callable[[], Any], quantiles: Sequence[float] | None = None, samples: int = 20,
                     replays: int = 5) -> float | list[float]:
    """Milliseconds of ``fn`` with the L2 cache overwritten before each call and no host launch time:
    a CUDA graph of ``samples`` (overwrite, call) pairs against one of the overwrites alone, the
    difference per call; median over ``replays``. The signature of ``triton.testing.do_bench``, for
    Triton's autotuner: kernels that stream their operands once (a matrix-vector product) are
    ranked as they run inside a model, where the weights are not in L2, and by their GPU time alone
    (Triton's own timing counts the launch when it outlasts the overwrite)."""
    try:
        median = _graph_per_call_ms(fn, samples, replays)
    except RuntimeError:  # a call that cannot be captured in a graph: Triton's own timing
        return triton.testing.do_bench(fn, quantiles=quantiles)
    return median if quantiles is None else [median] * len(quantiles)


def _graph_per_call_ms(fn: Callable[[], Any], samples: int, replays: int) -> float:
    flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")
    fn()  # compiles outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graphs = {}
    with torch.cuda.stream(stream):
        for with_call in (True, False):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                for _ in range(samples):
                    flush.zero_()
                    if with_call:
                        fn()
            graphs[with_call] = graph
    torch.cuda.current_stream().wait_stream(stream)
    times = {True: [], False: []}
    for _ in range(replays):
        for with_call, graph in graphs.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times[with_call].append(start.elapsed_time(end))
    per_call = sorted((a - b) / samples for a, b in zip(times[True], times[False]))
    return per_call[len(per_call) // 2]


class TunedKernel:
    """A ``@triton.jit`` kernel autotuned over ``configs`` after ``prune`` filtered them for the call.

    Launch it like a Triton kernel, ``tuned[grid](*args)``, every argument but the configs' own
    positionally: ``prune`` then sees them all by name on every Triton version (some pass it only the
    positional ones). ``bench`` replaces Triton's timing (e.g. :func:`cold_cache_bench`). Interpreted
    kernels run the first pruned config without timing any.
    """

    def __init__(self, kernel: Any, configs: list[triton.Config], key: list[str], prune: Pruner,
                 bench: Callable[..., Any] | None = None) -> None:
        self.kernel = kernel
        self.configs = configs
        self.prune = prune
        self.interpreted = isinstance(kernel, InterpretedFunction)
        timing = {"do_bench": bench} if bench is not None else {}  # Triton's own do_bench otherwise
        self.tuned = triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune},
                                     **timing)(kernel)

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        def launch(*args: Any, **kwargs: Any) -> Any:
            if not self.interpreted:
                return self.tuned[grid](*args, **kwargs)
            named = dict(zip(self.kernel.arg_names, args))
            config = self.prune(self.configs, named, **kwargs)[0]
            return self.kernel[grid](*args, **kwargs, **config.all_kwargs())

        return launch
