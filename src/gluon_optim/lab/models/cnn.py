"""A small image classifier in the style of Keller Jordan's airbench.

``stem -> conv group per width -> global pool -> linear head (-> fixed logit scale)``, where a
conv group is ``conv3x3 -> BN -> GELU -> conv3x3 -> BN -> GELU -> MaxPool2d(2)``. The convs have
no bias because a BatchNorm follows each of them and its shift does that job. Every parameter
is a conv kernel, a BatchNorm gain/shift or the head, so :func:`gluon_optim.assign_roles` needs
no arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

__all__ = ["CNN", "CNNConfig", "ConvGroup"]


@dataclass(frozen=True)
class CNNConfig:
    """Shape and options of a :class:`CNN`.

    Attributes:
        in_channels, num_classes: input channels (3 for CIFAR-10, 1 for digits) and classes.
        widths: output channels of each conv group; each group halves the spatial size.
        stem_width: channels of the stem conv.
        image_size: input height = width. Only used to decide which groups can still pool:
            a group whose input is already 1x1 skips its pool, so 8x8 digits work with any
            number of groups.
        bn_momentum: BatchNorm running-statistics momentum in PyTorch's convention (the weight
            of the newest batch). 0.4, as airbench, since lab runs are short and eval must see
            statistics of the current weights.
        bn_eps: BatchNorm epsilon.
        pool: the global pool before the head: ``"max"`` (airbench) or ``"avg"``.
        logit_scale: fixed factor on the logits (airbench uses 1/9 to soften the initial
            softmax); 1.0 leaves them as they are.
    """

    in_channels: int = 3
    num_classes: int = 10
    widths: tuple[int, ...] = (32, 64, 128)
    stem_width: int = 32
    image_size: int = 32
    bn_momentum: float = 0.4
    bn_eps: float = 1e-5
    pool: Literal["max", "avg"] = "max"
    logit_scale: float = 1.0

    def __post_init__(self) -> None:
        # A list from a JSON/CLI override becomes the tuple the frozen config promises.
        object.__setattr__(self, "widths", tuple(self.widths))
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(f"CNNConfig.widths must be positive and non-empty, got {self.widths}")
        for name in ("in_channels", "num_classes", "stem_width", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"CNNConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.pool not in ("max", "avg"):
            raise ValueError(f"CNNConfig.pool must be 'max' or 'avg', got {self.pool!r}")


def _conv_bn_gelu(c_in: int, c_out: int, cfg: CNNConfig) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out, eps=cfg.bn_eps, momentum=cfg.bn_momentum),
        nn.GELU(),
    ]


class ConvGroup(nn.Sequential):
    """``conv3x3 -> BN -> GELU -> conv3x3 -> BN -> GELU -> MaxPool2d(2)`` (pool optional)."""

    def __init__(self, c_in: int, c_out: int, cfg: CNNConfig, *, pool: bool) -> None:
        super().__init__(
            *_conv_bn_gelu(c_in, c_out, cfg),
            *_conv_bn_gelu(c_out, c_out, cfg),
            nn.MaxPool2d(2) if pool else nn.Identity(),
        )


class CNN(nn.Module):
    """Images ``(B, C, H, W)`` -> class logits ``(B, num_classes)``.

    ``head`` is the bias-free output ``nn.Linear``; ``embedding`` is ``None`` (no token input).
    """

    embedding: nn.Embedding | None = None

    def __init__(self, config: CNNConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.stem = nn.Sequential(*_conv_bn_gelu(c.in_channels, c.stem_width, c))
        groups: list[nn.Module] = []
        size, c_in = c.image_size, c.stem_width
        for width in c.widths:
            pool = size >= 2  # pooling a 1x1 map would leave nothing
            groups.append(ConvGroup(c_in, width, c, pool=pool))
            size, c_in = (size // 2 if pool else size), width
        self.groups = nn.Sequential(*groups)
        self.pool = nn.AdaptiveMaxPool2d(1) if c.pool == "max" else nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c.widths[-1], c.num_classes, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.groups(self.stem(x))  # (B, widths[-1], H', W')
        x = self.pool(x).flatten(1)  # (B, widths[-1])
        logits: Tensor = self.head(x) * self.config.logit_scale  # (B, num_classes)
        return logits
