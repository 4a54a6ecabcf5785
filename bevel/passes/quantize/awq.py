"""Activation-aware scaling of a layer's input channels before 4-bit rounding (Lin et al., "AWQ:
Activation-aware Weight Quantization for LLM Compression and Acceleration", section 3.2).

Channels that carry large activations matter most; scaling their weights up by ``s`` (and the
input down by ``1/s``) gives them finer steps after rounding. ``s = mean|x|^alpha``, with alpha
picked from a grid to minimise the layer's output error on calibration rows.
"""

from __future__ import annotations

from typing import Callable

import torch

# alpha grid of the search: 0 (no scaling) to 0.95, as in the paper's code
GRID = 20


def awq_scales(weight: torch.Tensor, rows: torch.Tensor, round_trip: Callable[[torch.Tensor], torch.Tensor]
               ) -> tuple[torch.Tensor, float]:
    """Per-input-channel factors ``s`` [K] for a [N, K] weight, and the relative output error they
    give on ``rows`` [R, K]; ``round_trip(w)`` is the weight after quantizing and dequantizing it."""
    w = weight.detach().float()
    x = rows.float()
    exact = x @ w.T
    norm = exact.norm().clamp(min=1e-12)
    importance = x.abs().mean(dim=0).clamp(min=1e-8)
    best, best_error = torch.ones_like(importance), float("inf")
    for step in range(GRID):
        alpha = step / GRID
        s = importance.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # centre the factors around 1
        approx = round_trip(w * s) / s
        error = float((x @ approx.T - exact).norm() / norm)
        if error < best_error:
            best, best_error = s, error
    return best, best_error
