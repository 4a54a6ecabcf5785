"""Token merging on an NVIDIA GPU: timm ViT-B/16 (random weights), batch 64, bf16.

Throughput (images/s) of the eager model, ``torch.compile`` of it, and bevel's ``tome(r=16)``
replayed as a CUDA graph (the token counts of a ViT are fixed at compile time, so the whole forward,
Triton matching and merge kernels included, is one graph replay with no launch overhead), the same
with bevel's compiled module passed through ``torch.compile`` first (Inductor fuses the layer norms,
activations and adds around bevel's ops, which it keeps as they are), and bevel's replay with
attention kept off cuDNN (with tome's log-size mask PyTorch chose cuDNN's attention, which took
longer on fewer tokens than eager's unmasked attention), all measured in this run on the same
input: CUDA events around each call, median of ``--repeats`` after ``--warmup``. Beside each: the
cosine of the logits to eager's and the share of unchanged top-1 classes on other random images.

    python benchmarks/tome_gpu.py --batch 64 --r 16
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

import bevel
from gpu_common import median_ms


def cuda_graph(fn: Callable[[torch.Tensor], torch.Tensor], static_input: torch.Tensor) -> Callable[[], torch.Tensor]:
    """``fn(static_input)`` captured once as a CUDA graph; the returned call replays it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # Triton compiles and autotunes outside the capture
            fn(static_input)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn(static_input)

    def replay() -> torch.Tensor:
        graph.replay()
        return output

    return replay


def without_cudnn_attention(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` with scaled_dot_product_attention limited to the flash, memory-efficient and math kernels."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def call(x: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return fn(x)

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="images per batch")
    parser.add_argument("--r", type=int, default=16, help="tokens merged per block")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls of each model before timing")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls of each model (the median is reported)")
    parser.add_argument("--no-inductor", action="store_true",
                        help="skip the row of bevel's module through torch.compile (saves its compile time)")
    parser.add_argument("--profile", action="store_true",
                        help="also print the GPU kernels of eager and of bevel's forward by total time")
    args = parser.parse_args()
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval().to("cuda", torch.bfloat16)
    images = torch.randn(args.batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    compiled = bevel.compile(model, f"cleanup | tome(r={args.r})", example_inputs=(images,), device="cuda",
                             dynamic_shapes="static")
    entry = compiled.report["tome"]
    if entry.status != "applied":
        print(compiled.report)
        raise SystemExit(f"tome was not applied ({entry.status}): {entry.reason}")
    inductor = torch.compile(model)
    bevel_runs = {f"bevel tome(r={args.r}), CUDA graph": compiled,  # each replayed as a CUDA graph
                  f"bevel tome(r={args.r}), CUDA graph, no cuDNN attn": without_cudnn_attention(compiled)}
    if not args.no_inductor:
        bevel_runs[f"bevel tome(r={args.r}) + compile, CUDA graph"] = torch.compile(compiled)
    with torch.no_grad():
        calls = {"eager": lambda: model(images), "torch.compile": lambda: inductor(images)}
        calls.update({name: cuda_graph(fn, images) for name, fn in bevel_runs.items()})
        times = median_ms(calls, args.repeats, args.warmup)
        fresh = torch.randn_like(images)
        want = model(fresh).float()
        fidelity = {"eager": want, "torch.compile": inductor(fresh).float()}
        fidelity.update({name: fn(fresh).float() for name, fn in bevel_runs.items()})
    tokens = compiled.report["tome"].stats["tokens"]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; vit_base_patch16_224 bf16, batch {args.batch}; "
          f"tokens {tokens[0]} -> {tokens[-1]}; median of {args.repeats} after {args.warmup} warm-up")
    print(f"{'':44s} {'ms':>8s} {'img/s':>9s} {'vs eager':>9s} {'vs compile':>10s} {'min cos':>8s} {'top-1':>6s}")
    for name, ms in times.items():
        cosine = F.cosine_similarity(fidelity[name], want)
        top1 = float((fidelity[name].argmax(-1) == want.argmax(-1)).float().mean())
        print(f"{name:44s} {ms:8.2f} {args.batch / ms * 1e3:9.0f} {times['eager'] / ms:8.2f}x "
              f"{times['torch.compile'] / ms:9.2f}x {float(cosine.min()):8.5f} {top1:6.3f}")
    if args.profile:
        for name, fn in (("eager", model), (f"bevel tome(r={args.r}), no CUDA graph", compiled)):
            print_kernel_profile(name, fn, images)


def print_kernel_profile(name: str, fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> None:
    """The 20 GPU kernels taking the most time over 5 calls of ``fn``, from torch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        fn(images)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn(images)
            torch.cuda.synchronize()
    print(f"\n{name}: GPU kernels over 5 calls")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60))


if __name__ == "__main__":
    main()
