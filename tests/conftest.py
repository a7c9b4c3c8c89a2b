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


def closure_losses(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> tuple[float, float]:
    """Train ``steps`` closure steps over 3 fixed batches; total loss on them before and after.

    For optimizers that evaluate each batch at two iterates (``step(closure)``).
    """
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 23, (4, 10), generator=gen) for _ in range(3)]
    first = sum(lm_loss(model, x).item() for x in batches)
    for k in range(steps):
        x = batches[k % 3]

        def closure(x: torch.Tensor = x) -> torch.Tensor:
            opt.zero_grad()
            loss = lm_loss(model, x)
            loss.backward()
            return loss

        opt.step(closure)
    return first, sum(lm_loss(model, x).item() for x in batches)


@pytest.fixture
def tiny() -> TinyNet:
    return TinyNet()


@pytest.fixture
def tied() -> TiedNet:
    return TiedNet()
