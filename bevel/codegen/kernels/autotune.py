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


class TunedKernel:
    """A ``@triton.jit`` kernel autotuned over ``configs`` after ``prune`` filtered them for the call.

    Launch it like a Triton kernel, ``tuned[grid](*args)``, every argument but the configs' own
    positionally: ``prune`` then sees them all by name on every Triton version (some pass it only the
    positional ones). Interpreted kernels run the first pruned config without timing any.
    """

    def __init__(self, kernel: Any, configs: list[triton.Config], key: list[str], prune: Pruner) -> None:
        self.kernel = kernel
        self.configs = configs
        self.prune = prune
        self.interpreted = isinstance(kernel, InterpretedFunction)
        self.tuned = triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune})(kernel)

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        def launch(*args: Any, **kwargs: Any) -> Any:
            if not self.interpreted:
                return self.tuned[grid](*args, **kwargs)
            named = dict(zip(self.kernel.arg_names, args))
            config = self.prune(self.configs, named, **kwargs)[0]
            return self.kernel[grid](*args, **kwargs, **config.all_kwargs())

        return launch
