"""Weight-only int8 and int4 (groups of 128) Triton linears against bf16 ``F.linear``, on an NVIDIA GPU.

For each (N, K) and each M (1: a decode step; 4096: a prefill), prints the median GPU time of the
three linears on the same bf16 input, measured together in this run, the speed-up of each over
bf16 ``F.linear``, and beside it the max abs error against the op's plain-torch reference (the
kernel's fidelity) and against a float32 linear of the unquantized weight (the quantization's
cost). Weights are random (``randn * 0.02``, no bias).

Timing: CUDA events around one call, after warm-up (which includes Triton's autotuning), with the
L2 cache overwritten before every sample so weights come from DRAM as in a real model. The GPU
is still busy with that overwrite when each call is queued, so Python's launch overhead is not
counted: these are kernel times.

    python benchmarks/quantize_gpu.py --repeats 50
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F


def median_times_ms(calls: dict[str, Callable[[], torch.Tensor]], repeats: int, warmup: int) -> dict[str, float]:
    """Median milliseconds of each call, samples alternating between the calls so drift hits all alike."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")  # larger than any GPU's L2
    for call in calls.values():
        for _ in range(warmup):
            call()
    torch.cuda.synchronize()
    events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {name: statistics.median(s.elapsed_time(e) for s, e in pairs) for name, pairs in events.items()}


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
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/quantize_gpu.py measures Triton kernels on an NVIDIA GPU, and this machine has no "
                 "CUDA device. On CPU, the kernels are checked (not timed) by "
                 "`TRITON_INTERPRET=1 pytest tests/codegen/test_quantized_linear_kernels.py`.")

    import triton

    from bevel.codegen.kernels.quantized_linear import (
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
    header = (f"{'M':>5} {'N':>6} {'K':>5}  {'linear':<16} {'median ms':>10} {'vs bf16':>8} "
              f"{'err vs ref':>11} {'err vs fp32':>12}")
    print(header)
    print("-" * len(header))
    for n, k in args.shapes:
        weight = torch.randn(n, k, device=device) * 0.02
        weight_bf16 = weight.bfloat16()
        q8, s8 = quantize_int8_per_channel(weight)
        q4, s4, z4 = quantize_int4_groups(weight, group)
        for m in args.rows:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            calls = {  # default arguments bind this iteration's tensors
                "bf16 F.linear": lambda x=x, w=weight_bf16: F.linear(x, w),
                "int8 weight": lambda x=x, q=q8, s=s8: triton_int8_weight_linear(x, q, s, None),
                f"int4 g{group}": lambda x=x, q=q4, s=s4, z=z4: triton_int4_weight_linear(x, q, s, z, group, None),
            }
            references = {
                "int8 weight": int8_weight_linear_reference(x, q8, s8, None),
                f"int4 g{group}": int4_weight_linear_reference(x, q4, s4, z4, group, None),
            }
            exact = F.linear(x.float(), weight)
            times = median_times_ms(calls, args.repeats, args.warmup)
            for name, call in calls.items():
                out = call()
                ref_error = f"{_max_abs(out, references[name]):.3e}" if name in references else "-"
                print(f"{m:>5} {n:>6} {k:>5}  {name:<16} {times[name]:>10.4f} "
                      f"{times['bf16 F.linear'] / times[name]:>7.2f}x {ref_error:>11} {_max_abs(out, exact):>12.3e}")
            del references, exact
        print()


if __name__ == "__main__":
    main()
