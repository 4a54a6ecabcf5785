"""What the MiniLM CPU benchmarks share: an ONNX file run in ONNX Runtime as a callable, the
fidelity of each candidate's sentence embeddings to the original's, the page faults of one call,
and the CPU's matrix instructions."""

from __future__ import annotations

import resource
from typing import Any, Callable

import numpy as np
import torch

from bevel.models import minilm


def onnxruntime_callable(path: str, threads: int) -> Callable[[torch.Tensor, torch.Tensor], list[torch.Tensor]]:
    """The ONNX model at ``path`` in ONNX Runtime's CPU provider with ``threads`` intra-op threads,
    called like MiniLM: ``run(ids, mask)`` -> its outputs as tensors."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # each session has its own thread pool, whose workers keep spinning after a call; where several
    # models are timed in turns on few cores, that spinning takes cores from the next model's call
    # (prune_cpu's pair on 2 cores: 1.26x with spinning when torch's model ran in between, 1.32-1.36x
    # when only the two ran; 1.35-1.36x either way without spinning, and every call faster)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
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


def cpu_matrix_features() -> str:
    """The CPU's int8/bf16 matrix instructions as torch sees them (they decide which GEMMs run fast)."""
    names = {"avx2": "AVX2", "avx512": "AVX-512", "vnni": "VNNI", "amx_tile": "AMX"}
    found = [label for key, label in names.items() if getattr(torch.cpu, f"_is_{key}_supported", lambda: False)()]
    return ", ".join(found) or "none detected"
