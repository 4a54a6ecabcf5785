"""Token merging on the CPU: bevel's ``tome`` against torch eager, with the fidelity beside each time.

Three measurements, each in this one process, calls alternating between the models, median of
``--repeats`` runs after ``--warmup`` untimed ones:

- ``padded``: MiniLM on a batch of real sentences padded to 128 tokens (as a server pads a batch
  to a fixed length). bevel's ``tome`` drops the padding no sentence needs and merges padding
  before real tokens; with ``pack=true`` it packs the sentences into as few rows as the longest
  one allows and merges within each sentence; ``unpad`` packs without merging (exact), to show
  what the merges add, and composed with W8A8 quantization. Fidelity: mean-pooled embeddings of
  256 held-out sentences, batched the same way.
- ``passages``: MiniLM on passages of real text that fill all 128 tokens (no padding: the gain is
  merging alone), for several r. Fidelity over every such passage the bundled text gives.
- ``vit``: timm ``vit_base_patch16_224`` with random weights, batch 8, ``tome(r=16)``. Fidelity:
  the cosine of the logits and the share of unchanged top-1 classes on other random images.

Fidelity is the minimum (and mean) cosine to the original model's output. Beside each time: the
page faults of one call (see ``minilm_common.page_faults_per_call``), which tell a run whose
times a model's fresh allocations distorted.

    python benchmarks/tome_cpu.py                      # all three
    python benchmarks/tome_cpu.py padded --repeats 10
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import bevel
from bevel.data import passages, sentences
from bevel.models import minilm
from bevel.runtime.timing import median_latencies_ms
from minilm_common import page_faults_per_call, speed_and_fidelity_rows

# MiniLM's sentence embeddings suffer most from merges in its first blocks, hence schedules that
# start late; r=8 everywhere for contrast. Packed, every merge is of real tokens (r per packed row)
PADDED_PIPELINES = ['cleanup | tome(r=[0, 0, 0, 10, 10, 10])',
                    'cleanup | tome(r=[0, 0, 0, 10, 10, 10], metric="hidden")',
                    'cleanup | tome(r=[0, 0, 8, 10, 12, 12], metric="hidden")',
                    'cleanup | tome(r=8, metric="hidden")',
                    'cleanup | tome(r=[0, 0, 0, 4, 4, 4], metric="hidden", pack=true)',
                    'cleanup | tome(r=[0, 0, 0, 8, 8, 8], metric="hidden", pack=true)',
                    'cleanup | unpad',
                    'cleanup | quantize.int8_dynamic | unpad']
PASSAGE_R = ["2", "4", "8", "12", "16", "[0, 12, 16, 20, 24, 0]", "[0, 12, 16, 20, 24, 27]"]


def padded(args: argparse.Namespace) -> None:
    model = minilm.load_minilm()
    example = minilm.example_inputs()
    timed = minilm.encode(sentences(args.batch, seed=3), pad_to_max=True)
    texts, _ = minilm.held_out_batches(256)
    held_out = [minilm.encode(texts[i:i + args.batch], pad_to_max=True) for i in range(0, len(texts), args.batch)]
    models = {"torch eager": model, "bevel cleanup": bevel.compile(model, "cleanup", example_inputs=example)}
    for pipeline in PADDED_PIPELINES:
        models[f"bevel {pipeline.removeprefix('cleanup | ')}"] = bevel.compile(model, pipeline, example_inputs=example)
    speed_and_fidelity_rows("MiniLM, sentences padded to 128", models, timed, held_out, args.repeats, args.warmup)


def full_passages(args: argparse.Namespace) -> None:
    model = minilm.load_minilm()
    texts = passages(10_000)
    batches = [minilm.encode(texts[i:i + args.batch]) for i in range(0, len(texts), args.batch)]
    timed = batches[0]
    # cleanup alone: bevel's graph without merging (its CPU linears on the library timed faster) is the
    # share of the speed-up that is not merging's
    models = {"torch eager": model, "bevel cleanup": bevel.compile(model, "cleanup", example_inputs=timed)}
    for r in PASSAGE_R:  # the same r in every block, and schedules that spare the first block (the last
        # one merges half the tokens before the last MLP, which costs the embeddings little)
        for metric in ("keys", "hidden"):
            pipeline = f'cleanup | tome(r={r}, metric="{metric}")'
            models[f"bevel tome(r={r}, metric={metric})"] = bevel.compile(model, pipeline, example_inputs=timed)
    speed_and_fidelity_rows("MiniLM, passages filling 128 tokens", models, timed, batches, args.repeats, args.warmup)


def vit(args: argparse.Namespace) -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    images = torch.randn(8, 3, 224, 224)
    compiled = bevel.compile(model, "cleanup | tome(r=16)", example_inputs=(images,))
    fresh = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(fresh), compiled(fresh)
    cosine = F.cosine_similarity(got, want)
    top1 = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    models = {"eager": model, "tome": compiled}
    latency = median_latencies_ms(models, (images,), runs=args.repeats, warmup=args.warmup)
    faults = page_faults_per_call(models, (images,))
    tokens = compiled.report["tome"].stats["tokens"]
    print(f"\ntimm vit_base_patch16_224 (random weights), batch 8, tome(r=16): tokens {tokens[0]} -> {tokens[-1]}")
    print(f"eager {latency['eager']:.0f} ms ({faults['eager']} page faults), tome {latency['tome']:.0f} ms "
          f"({faults['tome']}): {latency['eager'] / latency['tome']:.2f}x; logits min cosine "
          f"{float(cosine.min()):.5f} (mean {float(cosine.mean()):.5f}), top-1 unchanged {top1:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="*", help="what to measure: padded, passages, vit (default: all)")
    parser.add_argument("--batch", type=int, default=32, help="sentences or passages per MiniLM batch")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls of each model before timing")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls of each model (the median is reported)")
    args = parser.parse_args()
    sections = {"padded": padded, "passages": full_passages, "vit": vit}
    for section in args.sections:
        if section not in sections:
            parser.error(f"unknown section {section!r}; choose from {', '.join(sections)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} runs after "
          f"{args.warmup} warm-up")
    for section in args.sections or list(sections):
        sections[section](args)


if __name__ == "__main__":
    main()
