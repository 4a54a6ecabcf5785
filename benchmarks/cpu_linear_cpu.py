"""CPU linears on oneDNN (:mod:`bevel.codegen.cpu_linear`): what the choice per shape gains, alone.

In this one process, calls alternating, median of ``--repeats`` runs after ``--warmup``:

- ``shapes``: ``F.linear`` against oneDNN on MiniLM's, ViT-B's and a Llama MLP's products;
- ``minilm``: MiniLM on 32 passages of real text filling 128 tokens, torch eager against bevel's
  ``cleanup`` graph with every linear on ``aten.linear`` (``BEVEL_CPU_LINEAR=aten``) and with the
  measured choice (the default); fidelity is the minimum / mean cosine of the mean-pooled
  embeddings over every such passage;
- ``vit``: timm ``vit_base_patch16_224`` (random weights), batch 8, the same three; fidelity is the
  cosine of the logits on other random images.

    python benchmarks/cpu_linear_cpu.py
    python benchmarks/cpu_linear_cpu.py minilm --repeats 10
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

import bevel
from bevel.codegen.cpu_linear import CHOICE_VARIABLE, onednn_linear
from bevel.data import passages
from bevel.models import minilm
from bevel.runtime.timing import median_latencies_ms
from minilm_common import cpu_matrix_features, page_faults_per_call, speed_and_fidelity_rows

SHAPES = {"MiniLM q/k/v/o": (4096, 384, 384), "MiniLM FFN up": (4096, 384, 1536),
          "MiniLM FFN down": (4096, 1536, 384), "ViT-B qkv": (1576, 768, 2304), "ViT-B FFN up": (1576, 768, 3072),
          "Llama MLP up, 32 rows": (32, 4096, 11008), "Llama MLP down, 1 row": (1, 11008, 4096)}


def compiled_both_ways(model: torch.nn.Module, example: tuple) -> dict[str, torch.nn.Module]:
    """``model`` compiled with ``cleanup`` twice: every linear on aten, and each shape as measured."""
    models = {}
    for label, choice in (("bevel cleanup, linears on aten", "aten"), ("bevel cleanup, measured choice", "auto")):
        os.environ[CHOICE_VARIABLE] = choice
        models[label] = bevel.compile(model, "cleanup", example_inputs=example)
    os.environ.pop(CHOICE_VARIABLE)
    for choice in models["bevel cleanup, measured choice"].cpu_linears:
        print(f"  {choice}")
    return models


def shapes(args: argparse.Namespace) -> None:
    print(f"\n{'product':24s} {'rows x in -> out':>22s} {'F.linear ms':>12s} {'oneDNN ms':>10s} {'speed-up':>9s}")
    generator = torch.Generator().manual_seed(0)
    for name, (rows, inputs, outputs) in SHAPES.items():
        x = torch.randn(rows, inputs, generator=generator)
        weight, bias = torch.randn(outputs, inputs, generator=generator), torch.randn(outputs, generator=generator)
        calls = {"aten": lambda: F.linear(x, weight, bias), "onednn": lambda: onednn_linear(x, weight, bias)}
        latency = median_latencies_ms(calls, (), runs=args.repeats, warmup=args.warmup)
        print(f"{name:24s} {f'{rows} x {inputs} -> {outputs}':>22s} {latency['aten']:12.2f} "
              f"{latency['onednn']:10.2f} {latency['aten'] / latency['onednn']:8.2f}x")


def minilm_passages(args: argparse.Namespace) -> None:
    model = minilm.load_minilm()
    texts = passages(10_000)
    batches = [minilm.encode(texts[i:i + 32]) for i in range(0, len(texts), 32)]
    print("\nMiniLM choices:")
    models = {"torch eager": model, **compiled_both_ways(model, batches[0])}
    speed_and_fidelity_rows("MiniLM, passages filling 128 tokens", models, batches[0], batches, args.repeats,
                            args.warmup)


def vit(args: argparse.Namespace) -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    images = torch.randn(8, 3, 224, 224)
    print("\nViT-B/16 choices:")
    models = {"torch eager": model, **compiled_both_ways(model, (images,))}
    fresh = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(fresh)
        cosines = {label: F.cosine_similarity(m(fresh), want).min().item() for label, m in models.items()}
    latency = median_latencies_ms(models, (images,), runs=args.repeats, warmup=args.warmup)
    faults = page_faults_per_call(models, (images,))
    base = latency["torch eager"]
    print("\ntimm vit_base_patch16_224 (random weights), batch 8")
    print(f"{'model':40s} {'ms':>8s} {'speed-up':>9s} {'min cos':>9s} {'faults':>8s}")
    for label in models:
        print(f"{label:40s} {latency[label]:8.1f} {base / latency[label]:8.2f}x {cosines[label]:9.6f} "
              f"{faults[label]:8d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="*", help="what to measure: shapes, minilm, vit (default: all)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls of each model before timing")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls of each model (the median is reported)")
    args = parser.parse_args()
    sections = {"shapes": shapes, "minilm": minilm_passages, "vit": vit}
    for section in args.sections:
        if section not in sections:
            parser.error(f"unknown section {section!r}; choose from {', '.join(sections)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU matrix instructions: "
          f"{cpu_matrix_features()}; median of {args.repeats} runs after {args.warmup} warm-up")
    for section in args.sections or list(sections):
        sections[section](args)


if __name__ == "__main__":
    main()
