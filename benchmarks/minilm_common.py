"""What the MiniLM CPU benchmarks share: an ONNX file run in ONNX Runtime as a callable, the
fidelity of each candidate's sentence embeddings to the original's, the page faults of one call,
a table of speed and fidelity against a baseline, and the CPU's matrix instructions."""

from __future__ import annotations

import resource
from typing import Any, Callable

import numpy as np
import torch

from bevel.models import minilm
from bevel.runtime.timing import median_latencies_ms


def onnxruntime_session(path: str, threads: int) -> Any:
    """An ONNX Runtime CPU session of the ONNX model at ``path`` with ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # each session has its own thread pool, whose workers keep spinning after a call; where several
    # models are timed in turns on few cores, that spinning takes cores from the next model's call
    # (prune_cpu's pair on 2 cores: 1.26x with spinning when torch's model ran in between, 1.32-1.36x
    # when only the two ran; 1.35-1.36x either way without spinning, and every call faster)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def onnxruntime_callable(path: str, threads: int) -> Callable[[torch.Tensor, torch.Tensor], list[torch.Tensor]]:
    """The ONNX model at ``path`` in ONNX Runtime (:func:`onnxruntime_session`), called like MiniLM:
    ``run(ids, mask)`` -> its outputs as tensors."""
    session = onnxruntime_session(path, threads)
    names = [i.name for i in session.get_inputs()]

    def run(ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        feeds = dict(zip(names, (ids.numpy(), mask.numpy())))
        return [torch.from_numpy(np.asarray(o)) for o in session.run(None, feeds)]

    return run


def embedding_fidelity(models: dict[str, Any], held_out: list[tuple[torch.Tensor, torch.Tensor]],
                       reference: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Per model, the (minimum, mean) cosine of its mean-pooled sentence embeddings on ``held_out`` to
    ``reference``."""
    fidelity = {}
    for name, candidate in models.items():
        cosine = torch.nn.functional.cosine_similarity(minilm.sentence_embeddings(candidate, held_out), reference)
        fidelity[name] = (float(cosine.min()), float(cosine.mean()))
    return fidelity


def page_faults_per_call(models: dict[str, Callable[..., Any]], inputs: tuple[Any, ...]) -> dict[str, int]:
    """Minor page faults of one call of each model (after the timed ones). Fresh activation-sized
    allocations that the C library takes from and gives back to the system fault in every page they
    touch; on a small VM that can cost a fifth of a forward, and whether a process gets there depends
    on its allocation history, so the counts explain runs that differ."""
    faults = {}
    with torch.no_grad():
        for name, model in models.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            model(*inputs)
            faults[name] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return faults


def speed_and_fidelity_rows(name: str, models: dict, timed: tuple, batches: list, repeats: int, warmup: int) -> None:
    """Time ``models`` (the first is the baseline) on ``timed`` and print speed-up and fidelity on ``batches``."""
    model = next(iter(models.values()))
    reference = minilm.sentence_embeddings(model, batches)
    fidelity = embedding_fidelity(models, batches, reference)
    latency = median_latencies_ms(models, timed, runs=repeats, warmup=warmup)
    faults = page_faults_per_call(models, timed)
    base = next(iter(latency.values()))
    print(f"\n{name}: batch {tuple(timed[0].shape)}, real tokens {int(timed[1].sum())} of {timed[1].numel()}; "
          f"fidelity over {len(reference)} texts")
    print(f"{'model':66s} {'ms':>8s} {'speed-up':>9s} {'min cos':>9s} {'mean cos':>9s} {'faults':>8s}")
    for label in models:
        low, mean = fidelity[label]
        print(f"{label:66s} {latency[label]:8.1f} {base / latency[label]:8.2f}x {low:9.5f} {mean:9.5f} "
              f"{faults[label]:8d}")


def cpu_matrix_features() -> str:
    """The CPU's int8/bf16 matrix instructions as torch sees them (they decide which GEMMs run fast)."""
    names = {"avx2": "AVX2", "avx512": "AVX-512", "vnni": "VNNI", "amx_tile": "AMX"}
    found = [label for key, label in names.items() if getattr(torch.cpu, f"_is_{key}_supported", lambda: False)()]
    return ", ".join(found) or "none detected"
