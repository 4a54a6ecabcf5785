"""SmoothQuant's migration of activation outliers into the weights (Xiao et al., "SmoothQuant:
Accurate and Efficient Post-Training Quantization for Large Language Models", eq. 4).

Per input channel j: ``s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)``; the weight becomes
``W * s`` and the activation ``X / s``, so the product is unchanged while the activation's
outlier channels shrink before per-token quantization. The division is kept in the op as the
factor ``input_scale = 1 / s``.
"""

from __future__ import annotations

import torch

# bounds on s: a channel never seen non-zero in calibration, or a zero weight column, gets s = 1
_FLOOR = 1e-5


def smoothing_factors(activation_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """The per-input-channel factors ``s`` [K] for a [N, K] weight."""
    act = activation_absmax.float().clamp(min=_FLOOR)
    wmax = weight.detach().float().abs().amax(dim=0).clamp(min=_FLOOR)
    factors = act.pow(alpha) / wmax.pow(1 - alpha)
    usable = (activation_absmax > 0) & (weight.detach().abs().amax(dim=0) > 0) & torch.isfinite(factors)
    return torch.where(usable, factors, torch.ones_like(factors)).clamp(min=_FLOOR)
