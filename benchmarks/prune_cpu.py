"""Structured pruning on the CPU: MiniLM with half of every FFN's neurons removed
(``prune.structured(target="mlp", ratio=0.5)``) against the original, in torch and in ONNX Runtime.

All measured in this one process on the same batch (real sentences padded to ``--seq`` tokens),
calls alternating between the models, median of ``--repeats`` runs after ``--warmup`` untimed
ones. Beside each time: the fidelity of the sentence embeddings (mean-pooled last hidden states)
to the original over ``--sentences`` held-out sentences (none used for calibration, which takes 128
other sentences and their first two and four words): the minimum and the mean cosine; and the page
faults of one call (see ``minilm_common.page_faults_per_call``).

    python benchmarks/prune_cpu.py --batch 32 --seq 128 --repeats 10
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

import bevel
from bevel.data import prefixes, sentences
from bevel.models import minilm
from bevel.runtime.timing import median_latencies_ms
from minilm_common import embedding_fidelity, onnxruntime_callable, page_faults_per_call


def onnxruntime_session(compiled, path: str, threads: int):
    """The compiled model exported to ONNX and loaded in ONNX Runtime, as a callable."""
    compiled.export_onnx(path)
    return onnxruntime_callable(path, threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", default='cleanup | prune.structured(target="mlp", ratio=0.5, '
                                            'importance="activation")', help="the bevel pipeline timed")
    parser.add_argument("--batch", type=int, default=32, help="sentences in the timed batch")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sentence in the timed batch (padded)")
    parser.add_argument("--sentences", type=int, default=256, help="held-out sentences for the fidelity figures")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls of each model before timing")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls of each model (the median is reported)")
    args = parser.parse_args()

    threads = torch.get_num_threads()
    model = minilm.load_minilm()
    calibration_texts = sentences(128, seed=1)
    # with their first words too: a short sentence's final token runs through FFN neurons that full
    # sentences barely use (see bevel.data.prefixes)
    texts = calibration_texts + prefixes(calibration_texts)
    calibration = [minilm.encode(texts[i:i + 16]) for i in range(0, len(texts), 16)]
    _, held_out = minilm.held_out_batches(args.sentences, exclude=calibration_texts)
    timed = minilm.encode(sentences(args.batch, seed=3), max_length=args.seq, pad_to_max=True)

    example = minilm.example_inputs()
    pruned = bevel.compile(model, args.passes, example_inputs=example, calibration=calibration)
    original = bevel.compile(model, "cleanup", example_inputs=example)
    with tempfile.TemporaryDirectory() as folder:
        models = {"torch eager original": model, "torch pruned (bevel graph)": pruned,
                  "onnxruntime original": onnxruntime_session(original, os.path.join(folder, "original.onnx"),
                                                              threads),
                  "onnxruntime pruned": onnxruntime_session(pruned, os.path.join(folder, "pruned.onnx"), threads)}
        reference = minilm.sentence_embeddings(model, held_out)
        fidelity = embedding_fidelity(models, held_out, reference)
        latency = median_latencies_ms(models, timed, runs=args.repeats, warmup=args.warmup)
        faults = page_faults_per_call(models, timed)

    entry = pruned.report["prune.structured"]
    print(f"MiniLM, batch {tuple(timed[0].shape)}, torch {torch.__version__}, {threads} threads, "
          f"median of {args.repeats} runs after {args.warmup} warm-up; fidelity over {len(reference)} held-out "
          f"sentences; pipeline: {args.passes}; params {entry.before.params} -> {entry.after.params}, "
          f"GFLOPs {entry.before.flops / 1e9:.2f} -> {entry.after.flops / 1e9:.2f} at the example inputs")
    print(f"{'model':30s} {'ms':>8s} {'speed-up':>9s} {'min cos':>9s} {'mean cos':>9s} {'faults':>8s}")
    for name in models:
        base = latency["onnxruntime original" if name.startswith("onnxruntime") else "torch eager original"]
        low, mean = fidelity[name]
        print(f"{name:30s} {latency[name]:8.1f} {base / latency[name]:8.2f}x {low:9.5f} {mean:9.5f} "
              f"{faults[name]:8d}")


if __name__ == "__main__":
    main()
