"""Structured pruning of CNNs built from depthwise and grouped convs on the CPU: torchvision's
MobileNetV3-Large and EfficientNet-B0 (the expansion channels go with their depthwise filters),
RegNetY-400MF and ResNeXt-50 (a channel position goes from every group of a grouped conv) with a share
of their conv channels removed (``prune.structured(target="conv")``) against the originals, in torch
and in ONNX Runtime.

The weights are random (nothing is downloaded), with BatchNorm statistics taken from a few
train-mode passes over random images as a trained net holds them, so the time is real and the
fidelity beside it is only the agreement with the random original on other random images: how
much of a trained net's accuracy survives is what ``tests/models/test_prune_digits_cnn.py`` measures
(a trained inverted-residual net on digits). All in this one process, calls alternating between the
models, median of ``--repeats`` runs after ``--warmup`` untimed ones.

    python benchmarks/prune_cnn_cpu.py --batch 8 --size 224 --ratio 0.25 0.5 --round-to 8
    python benchmarks/prune_cnn_cpu.py --models regnet_y_400mf resnext50_32x4d --round-to 4
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.nn.functional as F

import bevel
from bevel.runtime.timing import median_latencies_ms
from minilm_common import onnxruntime_session

MODELS = ("mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf", "resnext50_32x4d")
# the grouped-conv models are asked for by name: their groups want a round_to of their own (4 for RegNet's
# groups of 8), which the depthwise models' 8 would not give
DEFAULT_MODELS = MODELS[:2]


def warmed(name: str, size: int) -> torch.nn.Module:
    """A random-weight torchvision model whose BatchNorms hold the statistics of what they see: their
    running averages over a few train-mode forwards of random images."""
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=1000)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a cumulative average over the forwards
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(8, 3, size, size))
    return model.eval()


def onnxruntime_images(path: str, threads: int):
    """The ONNX model at ``path`` in ONNX Runtime, called with one image batch."""
    session = onnxruntime_session(path, threads)
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=MODELS,
                        help="torchvision models (default: the two built from depthwise convs)")
    parser.add_argument("--ratio", type=float, nargs="+", default=[0.25, 0.5], help="share of channels removed")
    parser.add_argument("--round-to", type=int, default=8, help="keep every pruned width a multiple of this")
    parser.add_argument("--batch", type=int, default=8, help="images in the timed batch")
    parser.add_argument("--size", type=int, default=224, help="image height and width")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls of each model before timing")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls of each model (the median is reported)")
    args = parser.parse_args()

    threads = torch.get_num_threads()
    generator = torch.Generator().manual_seed(1)
    calibration = [(torch.randn(8, 3, args.size, args.size, generator=generator),) for _ in range(2)]
    timed = (torch.randn(args.batch, 3, args.size, args.size, generator=generator),)
    fresh = torch.randn(16, 3, args.size, args.size, generator=generator)
    print(f"torch {torch.__version__}, {threads} threads, batch {tuple(timed[0].shape)}, median of {args.repeats} "
          f"runs after {args.warmup} warm-up; random weights: the cosine and top-1 agreement are with the random "
          f"original on 16 other random images")
    print(f"GFLOPs of the {len(calibration[0][0])} example images; ms per timed batch")
    print(f"{'model':44s} {'params':>8s} {'GFLOPs':>7s} {'ms':>8s} {'speed-up':>9s} {'cosine':>7s} {'top-1':>6s}")
    for name in args.models:
        model = warmed(name, args.size)
        with torch.no_grad():
            reference = model(fresh)
        compiled = {"original": bevel.compile(model, "cleanup", example_inputs=calibration[0])}
        for ratio in args.ratio:
            pipeline = f'cleanup | prune.structured(target="conv", ratio={ratio}, round_to={args.round_to})'
            compiled[f"ratio {ratio}"] = bevel.compile(model, pipeline, example_inputs=calibration[0],
                                                       calibration=calibration)
        with tempfile.TemporaryDirectory() as folder:
            runners = {}
            for label, module in compiled.items():
                runners[f"{name} torch {label}"] = model if label == "original" else module
                path = module.export_onnx(os.path.join(folder, f"{label}.onnx"))
                runners[f"{name} onnxruntime {label}"] = onnxruntime_images(path, threads)
            latency = median_latencies_ms(runners, timed, runs=args.repeats, warmup=args.warmup)
            for label, module in compiled.items():
                figures = module.report.final
                for runtime in ("torch", "onnxruntime"):
                    key = f"{name} {runtime} {label}"
                    with torch.no_grad():
                        out = runners[key](fresh)
                    cosine = float(F.cosine_similarity(out, reference).mean())
                    top1 = float((out.argmax(-1) == reference.argmax(-1)).float().mean())
                    print(f"{key:44s} {figures.params / 1e6:7.2f}M {figures.flops / 1e9:7.2f} {latency[key]:8.1f} "
                          f"{latency[f'{name} {runtime} original'] / latency[key]:8.2f}x {cosine:7.4f} {top1:6.2f}")


if __name__ == "__main__":
    main()
