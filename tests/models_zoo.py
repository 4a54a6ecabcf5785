"""Small models for tests: an MLP, a conv net, attention blocks, and ones torch.export cannot capture."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def seeded(seed: int = 0) -> torch.Generator:
    """A torch generator with a fixed seed, for reproducible random inputs."""
    return torch.Generator().manual_seed(seed)


class MLP(nn.Module):
    """Linear layers with GELU and dropout, plus ops cleanup should remove (identity reshape, *1, clone)."""

    def __init__(self, sizes: tuple[int, ...] = (16, 32, 8), dropout: float = 0.1) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.drop(F.gelu(x))
        return (x.reshape(x.shape) * 1).clone()


class ConvNet(nn.Module):
    """Conv -> BatchNorm -> ReLU twice, pooled, then a Linear classifier."""

    def __init__(self, channels: int = 4, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels * 2, 3, stride=2)
        self.bn2 = nn.BatchNorm2d(channels * 2)
        self.head = nn.Linear(channels * 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


class AttentionBlock(nn.Module):
    """A pre-norm transformer block with nn.MultiheadAttention and a constant positional buffer."""

    def __init__(self, dim: int = 16, heads: int = 2, max_len: int = 32) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=0.1, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * dim, dim))
        # a buffer transformed by constant ops: cleanup folds it
        self.register_buffer("freqs", torch.arange(max_len, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.sin(self.freqs * 0.01)[: x.shape[1]].unsqueeze(-1)
        h = self.norm1(x + pos)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class SDPABlock(nn.Module):
    """Self-attention written with scaled_dot_product_attention and explicit head reshapes."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).contiguous()
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class MaskedAttentionBlock(nn.Module):
    """A pre-norm transformer block whose attention adds a padding bias made from a [B, N] mask:
    through scaled_dot_product_attention, or with ``written_out`` as matmul, softmax, dropout, matmul."""

    def __init__(self, dim: int = 32, heads: int = 4, written_out: bool = False) -> None:
        super().__init__()
        self.heads, self.written_out = heads, written_out
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        if self.written_out:
            scores = q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5 + bias
            y = self.drop(scores.softmax(dim=-1)) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = x + self.out(y.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class MaskedEncoder(nn.Module):
    """Token features and a padding mask in, no embedding: the first block reads the model's input itself."""

    def __init__(self, depth: int = 2, written_out: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MaskedAttentionBlock(written_out=written_out) for _ in range(depth))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mask)
        return x


def padded_tokens(g: torch.Generator, batch: int = 2, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, length, 32] token features and a mask whose first row is padded from the middle."""
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 2:] = 0
    return torch.randn(batch, length, 32, generator=g), mask


def right_padded_ids(g: torch.Generator, vocab: int, lengths: list[int],
                     width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An encoder's ``(input_ids, attention_mask)``: random ids in [5, vocab), one row per length, each
    padded on the right to ``width`` with id 0."""
    ids, mask = torch.randint(5, vocab, (len(lengths), width), generator=g), torch.zeros(len(lengths), width,
                                                                                        dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return ids.masked_fill(mask == 0, 0), mask


class DataDependent(nn.Module):
    """Branches on a tensor's value: torch.export cannot capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.linear(x)
        return -x
