"""W8A8 on the CPU: bevel's ``quantize.int8_dynamic`` against eager fp32, ONNX Runtime's
``quantize_dynamic`` and ``torch.ao`` dynamic quantization, on MiniLM with real weights.

All measured in this one process on the same batch (real sentences padded to ``--seq`` tokens),
calls alternating between the models, median of ``--repeats`` runs after ``--warmup`` untimed
ones. Beside each time: the fidelity of the sentence embeddings (mean-pooled last hidden states)
to fp32 eager over ``--sentences`` held-out sentences (none used for calibration): the minimum
and the mean cosine; and the page faults of one call (see ``minilm_common.page_faults_per_call``).

    python benchmarks/quantize_cpu.py --batch 32 --seq 128 --repeats 10
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import warnings

import torch

import bevel
from bevel.data import sentences
from bevel.models import minilm
from bevel.runtime.timing import median_latencies_ms
from minilm_common import cpu_matrix_features, embedding_fidelity, onnxruntime_callable, page_faults_per_call


def onnxruntime_int8(model: torch.nn.Module, example: tuple[torch.Tensor, ...], folder: str, threads: int):
    """ONNX Runtime's own dynamic int8 quantization of the fp32 ONNX export, as a callable."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32_path = os.path.join(folder, "fp32.onnx")
    bevel.compile(model, "cleanup", example_inputs=example).export_onnx(fp32_path)
    int8_path = os.path.join(folder, "int8.onnx")
    quantize_dynamic(fp32_path, int8_path, weight_type=QuantType.QInt8)
    return onnxruntime_callable(int8_path, threads)


def torch_ao_int8(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.ao`` dynamic quantization of every nn.Linear (qint8 weights, what its docs show)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization warns that it is deprecated
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", default="cleanup | quantize.int8_dynamic", help="the bevel pipeline timed")
    parser.add_argument("--batch", type=int, default=32, help="sentences in the timed batch")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sentence in the timed batch (padded)")
    parser.add_argument("--sentences", type=int, default=256, help="held-out sentences for the fidelity figures")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls of each model before timing")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls of each model (the median is reported)")
    args = parser.parse_args()

    threads = torch.get_num_threads()
    model = minilm.load_minilm()
    calibration_texts = sentences(64, seed=1)
    calibration = [minilm.encode(calibration_texts[i:i + 16]) for i in range(0, 64, 16)]
    _, held_out = minilm.held_out_batches(args.sentences, exclude=calibration_texts)
    timed = minilm.encode(sentences(args.batch, seed=3), max_length=args.seq, pad_to_max=True)

    compiled = bevel.compile(model, args.passes, example_inputs=minilm.example_inputs(), calibration=calibration)
    with tempfile.TemporaryDirectory() as folder:
        models = {"torch eager fp32": model, f"bevel {args.passes}": compiled,
                  "onnxruntime quantize_dynamic": onnxruntime_int8(model, minilm.example_inputs(), folder, threads),
                  "torch.ao quantize_dynamic": torch_ao_int8(model)}
        reference = minilm.sentence_embeddings(model, held_out)
        fidelity = embedding_fidelity(models, held_out, reference)
        latency = median_latencies_ms(models, timed, runs=args.repeats, warmup=args.warmup)
        faults = page_faults_per_call(models, timed)

    base = latency["torch eager fp32"]
    print(f"MiniLM, batch {tuple(timed[0].shape)}, torch {torch.__version__}, {threads} threads, "
          f"median of {args.repeats} runs after {args.warmup} warm-up; "
          f"fidelity over {len(reference)} held-out sentences; CPU: {cpu_matrix_features()}")
    print(f"{'model':42s} {'ms':>8s} {'speed-up':>9s} {'min cos':>9s} {'mean cos':>9s} {'faults':>8s}")
    for name in models:
        low, mean = fidelity[name]
        print(f"{name:42s} {latency[name]:8.1f} {base / latency[name]:8.2f}x {low:9.5f} {mean:9.5f} {faults[name]:8d}")


if __name__ == "__main__":
    main()
