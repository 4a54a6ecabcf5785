"""Latency measurement: median wall time of several models on the same inputs, measured together."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch


def median_latencies_ms(models: dict[str, Callable[..., Any]], inputs: tuple[Any, ...], runs: int = 10,
                        warmup: int = 3) -> dict[str, float]:
    """Median milliseconds per call of each model on ``inputs``, after ``warmup`` untimed calls.

    Calls alternate between the models, so drift in the machine's speed affects all of them alike
    and their ratio is fair. Runs without gradients; with CUDA inputs, the GPU is synchronized before
    each clock read.
    """
    times: dict[str, list[float]] = {name: [] for name in models}
    on_cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs)
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    with torch.no_grad():
        for i in range(warmup + runs):
            for name, model in models.items():
                sync()
                start = time.perf_counter()
                model(*inputs)
                sync()
                if i >= warmup:
                    times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}
