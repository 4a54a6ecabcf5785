"""Weight-only int8 and int4 (groups of 128) Triton linears against bf16 ``F.linear``, on an NVIDIA GPU.

For each (N, K) and each M (1: a decode step; 4096: a prefill), prints the median GPU time of the
linears on the same bf16 input (above 16 rows both prefill paths too: the fused Triton GEMM
``[kernel]`` and the weight dequantized then cuBLAS ``[dequantize]``; the unmarked line is the op's
own choice), measured together in this run, the speed-up of each over
bf16 ``F.linear``, and beside it the max abs error against the op's plain-torch reference (the
kernel's fidelity) and against a float32 linear of the unquantized weight (the quantization's
cost). Weights are random (``randn * 0.02``, no bias).

Timing: after warm-up (which includes Triton's autotuning), each call is captured in a CUDA graph
20 times, each time after overwriting the L2 cache so that weights come from DRAM as in a real
model; the graph's replay time, less that of the overwrites alone, per call. A graph replay has
no Python launch overhead (which outlasts a microsecond kernel), so these are kernel times.

    python benchmarks/quantize_gpu.py --repeats 50
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F


def median_times_ms(calls: dict[str, Callable[[], torch.Tensor]], repeats: int, warmup: int) -> dict[str, float]:
    """Median GPU milliseconds of each call with the L2 cache overwritten before it, after ``warmup``
    calls: ``repeats`` replays of a CUDA graph of 20 (overwrite, call) pairs, less the overwrites
    alone (bevel's ``cold_cache_bench``, which also ranks the single-row kernels' configs)."""
    from bevel.codegen.kernels.autotune import cold_cache_bench

    for call in calls.values():
        for _ in range(warmup):
            call()
    torch.cuda.synchronize()
    return {name: cold_cache_bench(call, replays=repeats) for name, call in calls.items()}


def sweep_single_row(weight_bf16: torch.Tensor, q8: torch.Tensor, s8: torch.Tensor, q4: torch.Tensor,
                     s4: torch.Tensor, z4: torch.Tensor, group: int, args: argparse.Namespace) -> None:
    """Median time of every config of the matrix-vector and the decode kernels at M = 1, launched
    directly (no autotuning), against bf16 ``F.linear``: which configs the lists should hold."""
    import math

    import triton

    from bevel.codegen.kernels import gemv, weight_only_matmul

    n, k = weight_bf16.shape
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
    s4f = s4.float()
    calls = {"bf16 F.linear": lambda: F.linear(x, weight_bf16)}
    for fmt, (q, s, z, g) in {"int8": (q8, s8, q8, 0), "int4": (q4, s4f, z4, group)}.items():
        int4 = fmt == "int4"
        zs = z.stride(0) if int4 else 0
        for c in gemv.GEMV_CONFIGS:
            bn, bk = c.kwargs["BLOCK_N"], max(c.kwargs["BLOCK_K"], g) if int4 else c.kwargs["BLOCK_K"]
            stages = c.kwargs["LOOP_STAGES"]
            calls[f"{fmt} gemv {bn}x{bk} w{c.num_warps} loop stages {stages}"] = (
                lambda q=q, s=s, z=z, g=g, int4=int4, zs=zs, bn=bn, bk=bk, c=c, stages=stages:
                gemv.gemv_kernel[(triton.cdiv(n, bn),)](
                    x, q, s, z, s, out, n, k, q.stride(0), s.stride(0), zs, int4, g, False,
                    BLOCK_N=bn, BLOCK_K=bk, LOOP_STAGES=stages, num_warps=c.num_warps, num_stages=c.num_stages))
        for c in weight_only_matmul.DECODE_CONFIGS:
            bn, bk = c.kwargs["BLOCK_N"], math.gcd(c.kwargs["BLOCK_K"], g) if int4 else c.kwargs["BLOCK_K"]
            calls[f"{fmt} decode {bn}x{bk} w{c.num_warps} s{c.num_stages}"] = (
                lambda q=q, s=s, z=z, g=g, int4=int4, zs=zs, bn=bn, bk=bk, c=c:
                weight_only_matmul.weight_only_matmul_kernel[(triton.cdiv(n, bn),)](
                    x, q, s, z, s, out, 1, n, k, 1, x.stride(0), q.stride(0), s.stride(0), zs, out.stride(0),
                    int4, g, False, "tf32", BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=1,
                    num_warps=c.num_warps, num_stages=c.num_stages))
    times = median_times_ms(calls, args.repeats, args.warmup)
    print(f"  sweep at M=1, N={n}, K={k}: " + ", ".join(
        f"{name} {times['bf16 F.linear'] / t:.2f}x" for name, t in times.items() if name != "bf16 F.linear"))


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _shape(text: str) -> tuple[int, int]:
    n, k = text.lower().split("x")
    return int(n), int(k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=_shape, nargs="+", default=[(4096, 4096), (11008, 4096)],
                        help="weight shapes NxK")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4096], help="values of M")
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size along K")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls of each kernel before timing")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls of each kernel (the median is reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    parser.add_argument("--sweep", action="store_true",
                        help="also time every config of the single-row kernels (matrix-vector and decode) at M=1")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/quantize_gpu.py measures Triton kernels on an NVIDIA GPU, and this machine has no "
                 "CUDA device. On CPU, the kernels are checked (not timed) by "
                 "`TRITON_INTERPRET=1 pytest tests/codegen/test_quantized_linear_kernels.py`.")

    import triton

    from bevel.codegen.kernels import gemv, weight_only_matmul
    from bevel.codegen.kernels.quantized_linear import (
        DECODE_MAX_ROWS,
        triton_int4_weight_linear,
        triton_int8_weight_linear,
    )
    from bevel.runtime.ops.int4_weight_linear import int4_weight_linear_reference
    from bevel.runtime.ops.int8_weight_linear import int8_weight_linear_reference
    from bevel.runtime.ops.quant_format import (
        quantize_int4_groups,
        quantize_int8_per_channel,
    )

    torch.manual_seed(args.seed)
    device = torch.device("cuda")
    group = args.group_size
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, triton {triton.__version__}; "
          f"median of {args.repeats} after {args.warmup} warm-up calls; bf16 activations")
    header = (f"{'M':>5} {'N':>6} {'K':>5}  {'linear':<24} {'median ms':>10} {'vs bf16':>8} "
              f"{'err vs ref':>11} {'err vs fp32':>12}")
    print(header)
    print("-" * len(header))
    for n, k in args.shapes:
        weight = torch.randn(n, k, device=device) * 0.02
        weight_bf16 = weight.to(torch.bfloat16)
        q8, s8 = quantize_int8_per_channel(weight)
        q4, s4, z4 = quantize_int4_groups(weight, group)
        for m in args.rows:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            calls = {"bf16 F.linear": lambda x=x, w=weight_bf16: F.linear(x, w)}
            references = {"int8": int8_weight_linear_reference(x, q8, s8, None),
                          "int4": int4_weight_linear_reference(x, q4, s4, z4, group, None)}
            # the op's own choice of path, and above the decode rows both prefill paths forced
            for path in ("auto",) if m <= DECODE_MAX_ROWS else ("auto", "kernel", "dequantize"):
                suffix = "" if path == "auto" else f" [{path}]"
                calls[f"int8 weight{suffix}"] = (  # default arguments bind this iteration's tensors
                    lambda x=x, q=q8, s=s8, p=path: triton_int8_weight_linear(x, q, s, None, prefill=p))
                calls[f"int4 g{group}{suffix}"] = (
                    lambda x=x, q=q4, s=s4, z=z4, p=path: triton_int4_weight_linear(x, q, s, z, group, None,
                                                                                    prefill=p))
            exact = F.linear(x.float(), weight)
            times = median_times_ms(calls, args.repeats, args.warmup)
            for name, call in calls.items():
                out = call()
                ref_error = "-" if name.startswith("bf16") else f"{_max_abs(out, references[name[:4]]):.3e}"
                print(f"{m:>5} {n:>6} {k:>5}  {name:<24} {times[name]:>10.4f} "
                      f"{times['bf16 F.linear'] / times[name]:>7.2f}x {ref_error:>11} {_max_abs(out, exact):>12.3e}")
            del references, exact
        if args.sweep:
            sweep_single_row(weight_bf16, q8, s8, q4, s4, z4, group, args)
        print()
    print("configs the autotuner chose (key: M bucket, N, K, int4, group size, bias):")
    for kernel_name, kernel in (("gemv", gemv.gemv), ("decode", weight_only_matmul.decode_matmul),
                                ("prefill", weight_only_matmul.prefill_matmul)):
        for key, config in getattr(kernel.tuned, "cache", {}).items():
            print(f"  {kernel_name} {key[:6]}: {config}")


if __name__ == "__main__":
    main()
