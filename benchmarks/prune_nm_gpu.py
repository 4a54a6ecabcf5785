"""``prune.nm`` (2:4) on a Llama-shaped MLP stack against the dense model, on an NVIDIA GPU.

The stack is ``--layers`` Llama MLP blocks (hidden 4096, intermediate 11008, SwiGLU, no bias, bf16,
random weights) with residual adds. For each M (rows of the input: 32 is a decode batch, 4096 and
16384 prefills) the script compiles the stack with ``prune.nm`` for that M, prints the kernel each
layer got (cuSPARSELt 2:4 or dense with zeros) with the dense/sparse time ratio the pass measured,
then the end-to-end median time of the dense stack (eager and bevel's graph without pruning) and of
the pruned one, measured together in this run. The pruned stack must never be slower than dense:
a layer only takes the sparse kernel where it was measured faster.

Outputs are checked against the same pruned weights in eager PyTorch (the sparse kernel's fidelity).

    python benchmarks/prune_nm_gpu.py --rows 32 4096 16384 --repeats 20
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn
import torch.nn.functional as F


class LlamaMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))``, as in Llama."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MLPStack(nn.Module):
    """Llama MLP blocks with residual adds."""

    def __init__(self, layers: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(LlamaMLP(hidden, intermediate) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 4096, 16384], help="values of M")
    parser.add_argument("--layers", type=int, default=2, help="MLP blocks in the stack")
    parser.add_argument("--hidden", type=int, default=4096, help="the model width K (the layer's input features)")
    parser.add_argument("--intermediate", type=int, default=11008, help="the FFN width N (the layer's output features)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls of each kernel before timing")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls of each kernel (the median is reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/prune_nm_gpu.py times cuSPARSELt against dense GEMMs on an NVIDIA GPU, and this "
                 "machine has no CUDA device. On CPU, prune.nm keeps every layer dense with zeros; its "
                 "checks are in tests/passes/test_prune_nm.py.")

    import bevel
    from bevel.runtime.timing import median_latencies_ms

    torch.manual_seed(args.seed)
    device = torch.device("cuda")
    model = MLPStack(args.layers, args.hidden, args.intermediate)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model = model.to(device=device, dtype=torch.bfloat16).eval()
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}; {args.layers} Llama MLP blocks "
          f"{args.hidden} -> {args.intermediate} -> {args.hidden}, bf16; median of {args.repeats} after "
          f"{args.warmup} warm-up calls")
    for rows in args.rows:
        x = torch.randn(rows, args.hidden, device=device, dtype=torch.bfloat16)
        dense = bevel.compile(model, "cleanup", example_inputs=(x,), device="cuda", dynamic_shapes="static")
        pruned = bevel.compile(model, "prune.nm", example_inputs=(x,), device="cuda", dynamic_shapes="static")
        entry = pruned.report["prune.nm"]
        if entry.status != "applied":
            print(f"M={rows}: prune.nm {entry.status}: {entry.reason}")
            continue
        print(f"\nM={rows}")
        for name, form in entry.stats["layers"].items():
            ratio = "-" if form["speedup"] is None else f"{form['speedup']:.2f}x"
            print(f"  {name:<28} {form['kernel']:<7} sparse speed-up {ratio:>7}  ({form['reason']})")
        # the same pruned weights in eager PyTorch: what the sparse kernel must reproduce
        reference = MLPStack(args.layers, args.hidden, args.intermediate).to(device=device, dtype=torch.bfloat16)
        reference.load_state_dict({n: p for n, p in pruned.graph_module.named_parameters()}, strict=True)
        with torch.no_grad():
            expected, got = reference(x).float(), pruned(x).float()
        error = float((got - expected).norm() / expected.norm())
        times = median_latencies_ms({"eager dense": model, "bevel dense": dense, "bevel prune.nm": pruned}, (x,),
                                    runs=args.repeats, warmup=args.warmup)
        print(f"  end to end: eager dense {times['eager dense']:.3f} ms, bevel dense {times['bevel dense']:.3f} ms, "
              f"prune.nm {times['bevel prune.nm']:.3f} ms -> {times['bevel dense'] / times['bevel prune.nm']:.2f}x "
              f"vs bevel dense, {times['eager dense'] / times['bevel prune.nm']:.2f}x vs eager; "
              f"sparse layers {entry.stats['sparse_kernel_layers']}/{len(entry.stats['layers'])}; relative "
              f"error vs eager on the same pruned weights {error:.2e}")
        del dense, pruned, reference


if __name__ == "__main__":
    main()
