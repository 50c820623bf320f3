"""Small real models for the optimizer tests: an MLP and one transformer block with separate Q, K, V."""
from __future__ import annotations

import math

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 6, hidden: int = 8, d_out: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class Block(nn.Module):
    """A post-LN transformer block with separate query, key, value and output projections."""

    def __init__(self, d: int = 8, heads: int = 2, ff: int = 16) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.norm1 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ff)
        self.fc2 = nn.Linear(ff, d)
        self.norm2 = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = self.norm1(x + self.out(y))
        return self.norm2(x + self.fc2(torch.relu(self.fc1(x))))


def make(kind: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = MLP() if kind == "mlp" else Block()
    return model.to(dtype)


def batches(kind: str, n: int, dtype: torch.dtype = torch.float64, seed: int = 1) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return [(torch.randn(16, 6, generator=g, dtype=dtype), torch.randn(16, 3, generator=g, dtype=dtype)) for _ in range(n)]
    return [(torch.randn(4, 5, 8, generator=g, dtype=dtype), torch.randn(4, 5, 8, generator=g, dtype=dtype)) for _ in range(n)]


def loss_fn(model: nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch
    return (model(x) - y).pow(2).mean()
