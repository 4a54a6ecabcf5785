"""``fuse_attention`` on the CPU: MiniLM in HF's written-out ("eager") attention, before and after.

MiniLM with real weights is switched to ``attn_implementation="eager"`` (matmul, softmax, matmul,
materializing every [batch, heads, tokens, tokens] weight) and timed, in this one process with the
calls alternating, median of ``--repeats`` runs after ``--warmup``, on a batch of real sentences
padded to ``--length`` tokens:

- torch eager, written-out attention (the baseline);
- bevel ``cleanup`` (the same ops, captured);
- bevel ``cleanup | fuse_attention`` (one ``scaled_dot_product_attention`` per layer);
- torch eager with HF's own ``sdpa`` attention, for reference.

Fidelity: the minimum and mean cosine of mean-pooled embeddings of 256 held-out sentences to the
baseline's.

    python benchmarks/fuse_attention_cpu.py --repeats 10
"""

from __future__ import annotations

import argparse

import torch

import bevel
from bevel.data import sentences
from bevel.models import minilm
from minilm_common import speed_and_fidelity_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="sentences per timed batch")
    parser.add_argument("--length", type=int, default=128, help="tokens the timed batch is padded to")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls of each model before timing")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls of each model (the median is reported)")
    args = parser.parse_args()

    eager = minilm.load_minilm()
    eager.set_attn_implementation("eager")
    fused_by_hf = minilm.load_minilm()
    fused_by_hf.set_attn_implementation("sdpa")
    example = minilm.example_inputs()
    models = {"torch eager, written-out attention": eager}
    for pipeline in ("cleanup", "cleanup | fuse_attention"):
        models[f"bevel {pipeline}"] = bevel.compile(eager, pipeline, example_inputs=example)
    models["torch eager, HF sdpa attention"] = fused_by_hf
    timed = minilm.encode(sentences(args.batch, seed=3), max_length=args.length, pad_to_max=True)
    _, held_out = minilm.held_out_batches(256, batch_size=32)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} runs after "
          f"{args.warmup} warm-up")
    speed_and_fidelity_rows("MiniLM in written-out attention, sentences padded", models, timed, held_out,
                            args.repeats, args.warmup)


if __name__ == "__main__":
    main()
