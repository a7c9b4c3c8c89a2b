"""Shared fixtures: deterministic seeds and small models with explicit roles."""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class TinyNet(nn.Module):
    """Embedding -> linear -> norm -> head, plus a conv branch: every role but ``tied``."""

    def __init__(self, vocab: int = 23, dim: int = 12, hidden: int = 20) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, hidden)
        self.ln = nn.LayerNorm(hidden)
        self.conv = nn.Conv1d(hidden, hidden, 3, padding=1)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(self.embedding(x)))  # (B, T, hidden)
        h = self.ln(h)
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(h)  # (B, T, vocab)


class TiedNet(nn.Module):
    """A tied embedding / output layer, as in nanoGPT."""

    def __init__(self, vocab: int = 19, dim: int = 10) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.block = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.block(self.wte(x))))


def lm_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on a (B, T) batch of token ids."""
    logits = model(x[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))


@pytest.fixture
def tiny() -> TinyNet:
    return TinyNet()


@pytest.fixture
def tied() -> TiedNet:
    return TiedNet()
