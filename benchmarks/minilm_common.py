"""What the MiniLM CPU benchmarks share: an ONNX file run in ONNX Runtime as a callable, and the
fidelity of each candidate's sentence embeddings to the original's."""

from __future__ import annotations

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
