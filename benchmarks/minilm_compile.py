"""MiniLM (real weights) on this machine: latency of the compiled model against eager PyTorch.

Prints, for one pipeline, the median latency of the original model and of the CompiledModule on
the same batch of real sentences (both measured in this run, after warm-up), their ratio, and the
fidelity figures of the compile report beside it.

    python benchmarks/minilm_compile.py --passes "cleanup | prune.magnitude(sparsity=0.3)" --batch 32
"""

from __future__ import annotations

import argparse

import torch

import bevel
from bevel.data import sentences
from bevel.models import minilm
from bevel.runtime.timing import median_latencies_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", default="cleanup | prune.magnitude(sparsity=0.3)", help="the bevel pipeline timed")
    parser.add_argument("--batch", type=int, default=32, help="sentences in the timed batch")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per sentence at most")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls of each model before timing")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls of each model (the median is reported)")
    args = parser.parse_args()

    model = minilm.load_minilm()
    batch = minilm.encode(sentences(args.batch, seed=7), max_length=args.max_length)
    cm = bevel.compile(model, args.passes, example_inputs=minilm.example_inputs(),
                       calibration=minilm.calibration_batches())
    latencies = median_latencies_ms({"eager": model, "bevel": cm}, batch, runs=args.repeats, warmup=args.warmup)
    eager, compiled = latencies["eager"], latencies["bevel"]
    fidelity = cm.report.fidelity
    print(cm.report)
    print(f"batch {tuple(batch[0].shape)}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"eager {eager:.1f} ms | bevel {compiled:.1f} ms | speed-up {eager / compiled:.2f}x | "
          f"cosine {fidelity.cosine:.5f} | max abs err {fidelity.max_abs_error:.3e}")


if __name__ == "__main__":
    main()
