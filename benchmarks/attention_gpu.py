"""Sparse attention and quantized-KV decode attention on an NVIDIA GPU, against SDPA and FlexAttention.

Prefill: causal attention of 32 heads x dim 128, bf16, batch 1, at each ``--lengths``, restricted
to a sliding window plus sink tokens (StreamingLLM; ``--window`` 1024 and ``--sinks`` 64 by
default). Three ways, measured together in one run on the same tensors:

- ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``: dense causal attention (the
  time the window saves against);
- FlexAttention with the same mask as a block mask (``torch.compile``'d, as its docs require);
- ``bevel::sparse_attention`` (its Triton block-sparse kernel), the op as a model calls it: the
  block table built from positions inside each call (default launch settings: 4 warps for blocks
  below 128, 8 from 128). For each block size the time with the table built once beforehand
  (kernel alone) is printed too, at each number of warps in ``--warps``, so the fastest is known.

Beside each time: the max abs error against FlexAttention (both compute the same mask) and, at the
shortest length, against float32 dense attention with the boolean mask.

Decode: one query per sequence and head over a full cache of ``--context`` slots (batch ``--batch``,
32 query heads, 8 KV heads, dim 128): SDPA over the bf16 cache, ``bevel::cache_attention`` over
the bf16 cache, over an int8 cache (one scale per token and head, ``bevel::quantize_kv``) and over
a 4-bit one (groups of 32), each at its default number of chunks and at the others in
``--splits``. Errors are against float32 attention over the bf16 cache.

Timing: CUDA events around one call, median of ``--repeats`` after ``--warmup``, calls alternating.

    python benchmarks/attention_gpu.py --lengths 4096 16384 32768 --context 32768
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gpu_common import median_ms


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max())


def prefill(args: argparse.Namespace) -> None:
    """Window + sinks prefill: SDPA causal, FlexAttention, bevel's block-sparse kernel."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from bevel.codegen.kernels.sparse_attention import triton_sparse_attention
    from bevel.runtime.ops.sparse_attention import positional_blocks

    window, sinks, heads, dim = args.window, args.sinks, 32, 128
    scale = dim ** -0.5
    flex = torch.compile(flex_attention, dynamic=False)

    def window_mask(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((q_idx - kv_idx < window) | (kv_idx < sinks))

    print(f"\nPrefill: batch 1, {heads} heads x dim {dim}, bf16, window {window} + {sinks} sinks; "
          f"median of {args.repeats} after {args.warmup} warm-up")
    print(f"{'tokens':>7} {'attention':<38} {'ms':>9} {'vs SDPA':>8} {'vs Flex':>8} {'err vs Flex':>12} "
          f"{'err vs fp32':>12}")
    for tokens in args.lengths:
        torch.manual_seed(tokens)
        q, k, v = (torch.randn(1, heads, tokens, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        positions = torch.arange(tokens, device="cuda")[None]
        block_mask = create_block_mask(window_mask, None, None, tokens, tokens, device="cuda")
        calls: dict[str, Callable[[], torch.Tensor]] = {
            "SDPA causal (dense)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            "FlexAttention window+sinks": lambda: flex(q, k, v, block_mask=block_mask, scale=scale),
        }
        for block in args.blocks:
            table = positional_blocks(positions, positions, [window], [sinks], block, heads)
            for i, warps in enumerate(args.warps):
                def op(block=block, warps=warps, table=None):
                    return triton_sparse_attention(q, k, v, positions, positions, [window], [sinks], table, block,
                                                   scale, num_warps=warps)
                if i == 0:  # the op as a model calls it, default launch settings
                    calls[f"bevel op, block {block}"] = lambda op=op: op(warps=None)
                calls[f"bevel kernel, block {block}, {warps} warps"] = lambda op=op, t=table: op(table=t)
        times = median_ms(calls, args.repeats, args.warmup)
        with torch.no_grad():
            want_flex = calls["FlexAttention window+sinks"]()
            exact = None
            if tokens == min(args.lengths) and tokens <= 8192:
                mask = window_mask(None, None, positions[0, :, None], positions[0, None, :])
                exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
            for name, call in calls.items():
                out = call()
                flex_err = "-" if name.startswith("SDPA") else f"{max_error(out, want_flex):.2e}"
                fp32_err = "-" if exact is None or name.startswith("SDPA") else f"{max_error(out, exact):.2e}"
                print(f"{tokens:>7} {name:<38} {times[name]:>9.3f} "
                      f"{times['SDPA causal (dense)'] / times[name]:>7.2f}x "
                      f"{times['FlexAttention window+sinks'] / times[name]:>7.2f}x {flex_err:>12} {fp32_err:>12}")
        del q, k, v, calls, block_mask
        torch.cuda.empty_cache()


def decode(args: argparse.Namespace) -> None:
    """One decode step over bf16, int8 and 4-bit caches."""
    from bevel.codegen.kernels.decode_attention import triton_cache_attention
    from bevel.runtime.ops.kv_quant import quantize_kv_reference

    batch, heads, kv_heads, dim, length = args.batch, 32, 8, 128, args.context
    scale = dim ** -0.5
    torch.manual_seed(1)
    q = torch.randn(batch, heads, 1, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, kv_heads, length, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(batch, kv_heads, length, dim, device="cuda", dtype=torch.bfloat16)
    q_pos = torch.full((batch, 1), length - 1, device="cuda")
    kv_pos = torch.arange(length, device="cuda").expand(batch, length).contiguous()
    k8, kp8 = quantize_kv_reference(k, 8, dim)
    v8, vp8 = quantize_kv_reference(v, 8, dim)
    k4, kp4 = quantize_kv_reference(k, 4, 32)
    v4, vp4 = quantize_kv_reference(v, 4, 32)
    caches = {"bf16": (k, v, None, None, 0, 1), "int8": (k8, v8, kp8, vp8, 8, dim),
              "int4 g32": (k4, v4, kp4, vp4, 4, 32)}
    calls: dict[str, Callable[[], torch.Tensor]] = {
        "SDPA, bf16 cache": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)}
    for name, (kc, vc, kp, vp, bits, group) in caches.items():
        for splits in [None, *args.splits]:
            label = f"bevel, {name} cache, {'default' if splits is None else splits} chunks"
            calls[label] = (lambda kc=kc, vc=vc, kp=kp, vp=vp, bits=bits, group=group, splits=splits:
                            triton_cache_attention(q, kc, vc, kp, vp, q_pos, kv_pos, [0], [0], scale, bits, group,
                                                   False, splits)[0])
    times = median_ms(calls, args.repeats, args.warmup)
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
    bf16_default = times["bevel, bf16 cache, default chunks"]
    cache_mib = {name: sum(t.numel() * t.element_size() for t in c[:4] if t is not None) / 2**20
                 for name, c in caches.items()}
    print(f"\nDecode: batch {batch}, {heads} query / {kv_heads} KV heads x dim {dim}, context {length}; "
          f"cache MiB: " + ", ".join(f"{n} {m:.0f}" for n, m in cache_mib.items()))
    print(f"{'attention':<42} {'ms':>8} {'vs SDPA':>8} {'vs bevel bf16':>14} {'err vs fp32':>12}")
    for name, call in calls.items():
        print(f"{name:<42} {times[name]:>8.4f} {times['SDPA, bf16 cache'] / times[name]:>7.2f}x "
              f"{bf16_default / times[name]:>13.2f}x {max_error(call(), exact):>12.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768], help="prefill tokens")
    parser.add_argument("--window", type=int, default=1024, help="tokens of the sliding window")
    parser.add_argument("--sinks", type=int, default=64, help="attention-sink tokens kept at the start")
    parser.add_argument("--blocks", type=int, nargs="+", default=[64, 128], help="block sizes of the sparse kernel")
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8], help="num_warps values swept")
    parser.add_argument("--context", type=int, default=32768, help="decode cache slots")
    parser.add_argument("--batch", type=int, default=8, help="decode batch")
    parser.add_argument("--splits", type=int, nargs="*", default=[8, 16, 32], help="decode chunk counts swept")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls of each kernel before timing")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls of each kernel (the median is reported)")
    parser.add_argument("--skip-prefill", action="store_true", help="skip the prefill timings")
    parser.add_argument("--skip-decode", action="store_true", help="skip the decode timings")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/attention_gpu.py times Triton attention kernels on an NVIDIA GPU, and this machine "
                 "has no CUDA device. On CPU the kernels are checked (not timed) by "
                 "`TRITON_INTERPRET=1 pytest tests/codegen/test_attention_kernels.py`.")
    import triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    if not args.skip_prefill:
        prefill(args)
    if not args.skip_decode:
        decode(args)


if __name__ == "__main__":
    main()
