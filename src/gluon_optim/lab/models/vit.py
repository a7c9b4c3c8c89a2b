"""A small Vision Transformer: patches -> pre-norm transformer blocks -> mean pool -> head.

The patch embedding is a strided ``nn.Conv2d`` (one kernel application per patch, the same as a
linear map on flattened patches), positions are a learned ``nn.Embedding`` over patch indices,
and the blocks are the GPT's :class:`~.gpt.Block` run non-causally with LayerNorm. There is no
class token: the head reads the mean of the patch tokens, so every parameter belongs to a
module type that :func:`gluon_optim.assign_roles` knows (a class token would be a bare
``nn.Parameter``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gluon_optim.lab.models.gpt import Block, gpt2_init_

__all__ = ["ViT", "ViTConfig"]


@dataclass(frozen=True)
class ViTConfig:
    """Shape and options of a :class:`ViT`.

    Attributes:
        image_size: input height = width; must be a multiple of ``patch_size``.
        patch_size: side of the square patches (4 for 32x32 CIFAR-10, 2 for 8x8 digits).
        in_channels, num_classes: input channels and classes.
        dim, depth, heads: width, number of blocks and attention heads.
        mlp_ratio: the MLP's hidden width over ``dim``.
        dropout: dropout on attention weights and residual branches.
    """

    image_size: int = 32
    patch_size: int = 4
    in_channels: int = 3
    num_classes: int = 10
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in (
            "image_size",
            "patch_size",
            "in_channels",
            "num_classes",
            "dim",
            "depth",
            "heads",
            "mlp_ratio",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"ViTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"ViTConfig: image_size={self.image_size} is not a multiple of "
                f"patch_size={self.patch_size}"
            )
        if self.dim % self.heads:
            raise ValueError(f"ViTConfig: dim={self.dim} is not divisible by heads={self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ViTConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def num_patches(self) -> int:
        """Patches per image: ``(image_size / patch_size) ** 2``."""
        return (self.image_size // self.patch_size) ** 2


class ViT(nn.Module):
    """Images ``(B, C, H, W)`` with ``H = W = image_size`` -> class logits ``(B, num_classes)``.

    ``head`` is the output ``nn.Linear``; ``embedding`` is ``None`` (no token input; the
    position table ``pos`` still gets the ``embedding`` role by its type).
    """

    embedding: nn.Embedding | None = None

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.patch = nn.Conv2d(c.in_channels, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.pos = nn.Embedding(c.num_patches, c.dim)
        self.blocks = nn.ModuleList(
            Block(
                c.dim,
                c.heads,
                causal=False,
                norm=nn.LayerNorm,
                mlp_ratio=c.mlp_ratio,
                dropout=c.dropout,
            )
            for _ in range(c.depth)
        )
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.num_classes)
        gpt2_init_(self, c.depth)

    def forward(self, x: Tensor) -> Tensor:
        size = self.config.image_size
        if x.shape[-2:] != (size, size):
            raise ValueError(
                f"ViT: expected {size}x{size} images, got {tuple(x.shape[-2:])}; the position "
                "table has one row per patch of the configured image_size"
            )
        x = self.patch(x)  # (B, dim, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, dim): one token per patch, row-major
        x = x + self.pos(torch.arange(x.shape[1], device=x.device))  # (B, N, dim) + (N, dim)
        for block in self.blocks:
            x = block(x)  # (B, N, dim)
        x = self.norm(x).mean(dim=1)  # (B, dim)
        logits: Tensor = self.head(x)  # (B, num_classes)
        return logits
