"""Small MODEL callables for the CLI tests (``cli_models:small_mlp`` and friends), each cheap to capture."""

from __future__ import annotations

import torch
from torch import nn


class SmallMLP(nn.Module):
    """Two linear layers with dropout between them: cleanup has something to remove."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def small_mlp() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A SmallMLP with seeded weights and one batch of inputs."""
    torch.manual_seed(0)
    return SmallMLP().eval(), (torch.randn(4, 16),)


def exits() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A builder that ends the process (as a script's ``main`` might) instead of returning."""
    raise SystemExit(3)


def module_only() -> nn.Module:
    """Only a module: the CLI needs example inputs from elsewhere (--calibration)."""
    torch.manual_seed(0)
    return SmallMLP().eval()


def calibration() -> list[tuple[torch.Tensor]]:
    """Three batches for SmallMLP."""
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 16, generator=generator),) for _ in range(3)]


def branch_on_values() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A model torch.export cannot capture (data-dependent control flow)."""
    from tests.models_zoo import DataDependent

    return DataDependent().eval(), (torch.ones(2, 4),)


def raises() -> nn.Module:
    """A builder that fails, as a user's might."""
    raise RuntimeError("checkpoint weights.bin not found")


def wrong_type() -> str:
    """Returns something that is not a model."""
    return "not a model"


NOT_CALLABLE = 42


def padded_bert() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A random HF BERT (1 layer, hidden 32) on a padded batch: what the token passes rewrite."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ids = torch.randint(1, 1000, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    return BertModel(config).eval(), (ids * mask, mask)


def decoder_lm() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A random 2-layer Llama on two padded prompts: a causal LM, exported with its KV cache."""
    from tests.decoders import padded_prompts, small_causal_lm

    return small_causal_lm("llama"), padded_prompts([5, 3])
