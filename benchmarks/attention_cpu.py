"""Sparse attention and KV-cache compression on the CPU: prefill attention time of each pattern against
dense SDPA at 2K and 8K tokens on tinylm-sized heads, and tinylm's held-out perplexity under each pass.

Timing: one layer's prefill attention, batch 1, tinylm's heads (6 query heads sharing 2 KV heads of
32 dims, float32), random inputs; dense is ``F.scaled_dot_product_attention(is_causal=True)`` with
grouped-query attention; each pattern is ``bevel::sparse_attention`` (CPU face) with the pattern's
window, per-head windows or estimated block table (``block_sparse`` includes the estimate itself).
Figures are the median of ``--repeats`` calls after one warm-up, alternating, in one process; the
ratio is SDPA's time over the pattern's (above 1: the pattern is faster).

Quality: tinylm was trained on 1024-token windows, so its perplexity is measured at a context of
1024 (the first ``--text-bytes`` bytes of its held-out split, stride 512): full attention against
``attention.window(window=256, sinks=4)``, the same with ``sinks=0``, ``attention.heads`` and
``attention.block_sparse`` at the window's share of computed attention (matched sparsity), and
``kv.quantize`` at 8 and 4 bits. ``kv.evict`` changes only the decode loop, so it (and the window,
for comparison) is also scored through the loop with ``bevel.eval.decode_perplexity``: a 32-token
prompt, then ``--decode-tokens`` tokens fed one at a time, in ``--decode-segments`` places of the text.

    python benchmarks/attention_cpu.py
    python benchmarks/attention_cpu.py --lengths 2048 8192 --repeats 5 --text-bytes 16384
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import bevel
from bevel.eval import decode_perplexity, perplexity
from bevel.models import tinylm
from bevel.runtime.ops.attention_blocks import element_density
from bevel.runtime.ops.sparse_attention import positional_density

HEADS, KV_HEADS, DIM = 6, 2, 32
WINDOW, SINKS, BLOCK = 256, 4, 64
CONTEXT = 1024
EXAMPLE = tinylm.prompts(["The object model", "A function"])  # captures; calibration is separate


def patterns(length: int) -> dict[str, dict]:
    """The patterns timed: their per-head windows and sinks, and whether blocks are estimated."""
    target = positional_density(length, [WINDOW], [SINKS], 1)
    share = heads_share(length, target)
    streaming = [WINDOW // 4] * (HEADS - round(share * HEADS)) + [0] * round(share * HEADS)
    return {
        f"window {WINDOW}+{SINKS} sinks": dict(window=[WINDOW], sinks=[SINKS], estimate=None),
        f"heads ({HEADS - streaming.count(0)}/{HEADS} at window {WINDOW // 4})":
            dict(window=streaming, sinks=[SINKS if w else 0 for w in streaming], estimate=None),
        f"block_sparse (density {target:.3f})": dict(window=[0], sinks=[0], estimate=target),
    }


def heads_share(length: int, target: float, narrow: int = WINDOW // 4) -> float:
    """The share of full heads that, with the others at a window of ``narrow``, computes ``target``."""
    small = positional_density(length, [narrow], [SINKS], 1)
    return max(0.0, min(1.0, (target - small) / (1 - small)))


def time_calls(calls: dict[str, callable], repeats: int) -> dict[str, float]:
    """Median seconds per call, the calls alternating, after one warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(repeats + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def prefill_timing(lengths: list[int], repeats: int) -> None:
    """Print SDPA against every pattern at each length."""
    print(f"\nprefill attention, one layer, batch 1, {HEADS} query heads / {KV_HEADS} KV heads x {DIM}, float32; "
          f"median of {repeats}")
    print(f"{'tokens':>6s}  {'pattern':34s} {'ms':>9s} {'SDPA ms':>9s} {'SDPA/pattern':>12s} {'computed':>9s}")
    for length in lengths:
        generator = torch.Generator().manual_seed(length)
        q = torch.randn(1, HEADS, length, DIM, generator=generator)
        k = torch.randn(1, KV_HEADS, length, DIM, generator=generator)
        v = torch.randn(1, KV_HEADS, length, DIM, generator=generator)
        positions = torch.arange(length)[None]
        scale = DIM ** -0.5
        calls = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)}
        shares = {}
        for name, p in patterns(length).items():
            def call(p=p):
                table = None
                if p["estimate"] is not None:
                    table = torch.ops.bevel.estimate_attention_blocks(q, k, positions, positions, BLOCK, p["estimate"],
                                                                      0.0, 1, 1, scale)
                return torch.ops.bevel.sparse_attention(q, k, v, positions, positions, p["window"], p["sinks"],
                                                        table, BLOCK, scale), table
            _, table = call()
            shares[name] = element_density(table, positions, positions, p["window"], p["sinks"], BLOCK) \
                if table is not None else positional_density(length, p["window"], p["sinks"], HEADS)
            calls[name] = call
        times = time_calls(calls, repeats)
        for name in shares:
            print(f"{length:6d}  {name:34s} {1e3 * times[name]:9.2f} {1e3 * times['sdpa']:9.2f} "
                  f"{times['sdpa'] / times[name]:12.2f} {shares[name]:9.3f}")


def selected(pipelines: dict[str, str], only: list[str] | None) -> dict[str, str]:
    """Full attention and the pipelines whose names contain a word of ``only`` (all without it)."""
    if not only:
        return pipelines
    return {name: p for name, p in pipelines.items() if name == "full attention" or any(w in name for w in only)}


def quality(text_bytes: int, decode_tokens: int, segments: int, only: list[str] | None = None) -> None:
    """Print tinylm's held-out perplexity under every pass (see the module docstring); with ``only``,
    full attention and the passes whose names contain one of those words."""
    model = tinylm.load_tinylm()
    text = tinylm.held_out_text()[:text_bytes]
    calibration = tinylm.text_windows(count=2, batch_size=2, length=CONTEXT)
    target = positional_density(CONTEXT, [WINDOW], [SINKS], 1)
    pipelines = {
        "full attention": "cleanup",
        f"attention.window(window={WINDOW}, sinks={SINKS})": f"attention.window(window={WINDOW}, sinks={SINKS})",
        f"attention.window(window={WINDOW}, sinks=0)": f"attention.window(window={WINDOW}, sinks=0)",
    }
    # matched sparsity: streaming heads at a narrower window, enough heads full to compute the window's share
    for narrow in (WINDOW // 4, WINDOW // 2, 3 * WINDOW // 4):
        share = heads_share(CONTEXT, target, narrow)
        pipelines[f"attention.heads(window={narrow}, retrieval_share={share:.3f})"] = \
            f"attention.heads(window={narrow}, sinks={SINKS}, retrieval_share={share:.4f})"
    # the density parameter counts reachable blocks, not elements: two settings bracket the window's share
    for density in (target, 0.85 * target):
        pipelines[f"attention.block_sparse(density={density:.3f})"] = f"attention.block_sparse(density={density:.4f})"
    pipelines.update({
        "kv.quantize(bits=8)": "kv.quantize(bits=8)",
        "kv.quantize(bits=4, group_size=16)": "kv.quantize(bits=4, group_size=16)",
    })
    pipelines = selected(pipelines, only)
    print(f"\ntinylm held-out perplexity, first {len(text)} bytes, context {CONTEXT}, stride {CONTEXT // 2}; "
          f"share of causal attention computed at {CONTEXT} tokens (window {WINDOW}+{SINKS}: {target:.3f})")
    print(f"{'pass':48s} {'perplexity':>10s} {'delta':>8s} {'computed':>9s}")
    full = None
    for name, pipeline in pipelines.items():
        cm = bevel.compile(model, pipeline, example_inputs=EXAMPLE, calibration=calibration, max_cache_len=CONTEXT)
        entry = cm.report.passes[-1]
        if entry.status not in ("applied", "no change"):
            print(f"{name:48s} {entry.status}: {entry.reason}")
            continue
        ppl = perplexity(cm, text, context=CONTEXT, stride=CONTEXT // 2)
        full = full if full is not None else ppl
        stats = entry.stats
        computed = stats.get("density_1k") or stats.get("density")
        computed = computed.get("1024") if isinstance(computed, dict) else computed
        print(f"{name:48s} {ppl:10.4f} {100 * (ppl / full - 1):+7.2f}% "
              f"{'' if computed is None else f'{computed:9.3f}'}")
    if decode_tokens:
        decode_quality(model, text, decode_tokens, segments, only)


def decode_quality(model, text: str, tokens: int, segments: int, only: list[str] | None = None) -> None:
    """kv.evict at a quarter of the cache, and the window, scored through the decode loop."""
    prompt = 32
    ids = tinylm.encode(text)
    starts = [i * (ids.numel() - prompt - tokens) // max(1, segments - 1) for i in range(segments)]
    budget = 0.25
    windows = [f"attention.window(window={WINDOW}, sinks={sinks})" for sinks in (SINKS, 0)]
    pipelines = {"full attention": "cleanup",
                 f"kv.evict(budget={budget}) = {int(budget * CONTEXT)} entries": f"kv.evict(budget={budget})",
                 f"kv.evict(budget={budget}, recent=1.0) (a window)": f"kv.evict(budget={budget}, recent=1.0)",
                 **{window: window for window in windows}}
    pipelines = selected(pipelines, only)
    print(f"\nthrough the decode loop: {segments} segments of a {prompt}-token prompt then {tokens} tokens one at a "
          f"time (max_cache_len {CONTEXT})")
    print(f"{'pass':48s} {'perplexity':>10s} {'delta':>8s}")
    full = None
    for name, pipeline in pipelines.items():
        cm = bevel.compile(model, pipeline, example_inputs=EXAMPLE, max_cache_len=CONTEXT)
        nll = [torch.tensor(decode_perplexity(cm, ids[s:], prompt=prompt, tokens=tokens)).log() for s in starts]
        ppl = torch.stack(nll).mean().exp().item()
        full = full if full is not None else ppl
        print(f"{name:48s} {ppl:10.4f} {100 * (ppl / full - 1):+7.2f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192], help="prefill tokens timed")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--text-bytes", type=int, default=16384, help="held-out bytes scored (default 16384)")
    parser.add_argument("--decode-tokens", type=int, default=992, help="tokens scored per decode segment")
    parser.add_argument("--decode-segments", type=int, default=2, help="decode segments (default 2)")
    parser.add_argument("--skip-timing", action="store_true", help="only the perplexities")
    parser.add_argument("--skip-decode", action="store_true", help="no perplexities through the decode loop")
    parser.add_argument("--only", nargs="+", default=None,
                        help="perplexities of full attention and the passes whose names contain these words")
    parser.add_argument("--skip-quality", action="store_true", help="only the timings")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.skip_timing:
        prefill_timing(args.lengths, args.repeats)
    if not args.skip_quality:
        quality(args.text_bytes, args.decode_tokens if not args.skip_decode else 0, args.decode_segments, args.only)


if __name__ == "__main__":
    main()
