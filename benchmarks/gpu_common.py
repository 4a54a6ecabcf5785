"""What the GPU benchmarks share: the median GPU time of several calls measured together."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def median_ms(calls: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, float]:
    """Median milliseconds of each call (CUDA events around it), after ``warmup`` untimed calls;
    samples alternate between the calls so drift hits all alike."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    torch.cuda.synchronize()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            samples[name].append(start.elapsed_time(end))
    return {name: statistics.median(values) for name, values in samples.items()}
