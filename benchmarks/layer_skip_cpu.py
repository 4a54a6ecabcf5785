"""Layer skipping on the CPU: tinylm's decoding speed and held-out perplexity, original against
``layer_skip.static(n=2)`` and ``layer_skip.early_exit`` at three thresholds.

Every variant is compiled from the shipped tinylm in this process. Decoding: greedy, ``--new``
tokens per sequence after prompts of real English text, no early stop, batch 1 and 8; the variants'
calls alternate, one round after another, and each figure is the median of ``--repeats`` rounds
after one warm-up round; the ratio is against the original measured in the same run. Beside each:
the held-out perplexity (the first ``--text-bytes`` bytes of tinylm's held-out split, 512 bytes of
context, stride 256) and the average number of blocks its tokens ran (early exit: measured on that
text and, separately, on the generated tokens).

    python benchmarks/layer_skip_cpu.py
    python benchmarks/layer_skip_cpu.py --thresholds 0.6 0.8 0.9 --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import bevel
from bevel.data import sentences
from bevel.eval import perplexity
from bevel.models import tinylm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", type=int, default=64, help="tokens generated per sequence (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--thresholds", type=float, nargs=3, default=[0.6, 0.8, 0.9],
                        help="early-exit thresholds (default 0.6 0.8 0.9)")
    parser.add_argument("--criterion", default="max_prob", help="early-exit criterion (default max_prob)")
    parser.add_argument("--text-bytes", type=int, default=8192, help="held-out bytes scored (default 8192)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; tinylm, {args.new} new tokens, "
          f"median of {args.repeats} rounds")
    model = tinylm.load_tinylm()
    calibration = tinylm.text_windows(count=4, batch_size=4, length=256)
    pipelines = {"original": "cleanup", "static n=2": "cleanup | layer_skip.static(n=2, probe=false)"}
    for threshold in args.thresholds:
        pipelines[f"early exit {threshold}"] = (f"cleanup | layer_skip.early_exit(threshold={threshold}, "
                                                f"criterion=\"{args.criterion}\")")
    compiled = {name: bevel.compile(model, pipeline, calibration=calibration, max_cache_len=1024)
                for name, pipeline in pipelines.items()}
    text = tinylm.held_out_text()[:args.text_bytes]
    quality = {}
    for name, cm in compiled.items():
        if cm.early_exit is not None:
            cm.early_exit.reset()
        ppl = perplexity(cm, text, context=512, stride=256)
        quality[name] = (ppl, _depth(cm))
    print(f"held-out perplexity over {len(text)} bytes (original {quality['original'][0]:.3f})")
    print(f"{'variant':16s} {'batch':>5s} {'tok/s':>8s} {'ratio':>7s} {'perplexity':>11s} {'depth (text)':>13s} "
          f"{'depth (decode)':>15s}")
    for batch in (1, 8):
        ids, mask = tinylm.prompts(sentences(batch, seed=21))
        times: dict[str, list[float]] = {name: [] for name in compiled}
        depths = {}
        for round_index in range(args.repeats + 1):  # round 0 is the warm-up
            for name, cm in compiled.items():
                if cm.early_exit is not None:
                    cm.early_exit.reset()
                start = time.perf_counter()
                cm.generate(ids, max_new_tokens=args.new, attention_mask=mask, eos_token_id=None)
                if round_index:
                    times[name].append(time.perf_counter() - start)
                depths[name] = _depth(cm, decode_only=True)
        base = statistics.median(times["original"])
        for name, values in times.items():
            seconds = statistics.median(values)
            ppl, text_depth = quality[name]
            print(f"{name:16s} {batch:5d} {batch * args.new / seconds:8.1f} {base / seconds:6.2f}x {ppl:11.3f} "
                  f"{text_depth:13.2f} {depths[name]:15.2f}")


def _depth(cm, decode_only: bool = False) -> float:
    """The average number of blocks the compiled model's tokens ran since its counters were reset
    (early exit), or the number of blocks it has."""
    if cm.early_exit is not None:
        return cm.early_exit.average(decode_only)
    removed = [n for p in cm.report.passes for n in p.stats.get("removed", [])]
    return float(tinylm.CONFIG["num_hidden_layers"] - len(removed))


if __name__ == "__main__":
    main()
