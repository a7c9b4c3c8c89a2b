"""timm and torchvision models with the plain call (``make test-vision``, its own environment).

PyPI's torchvision for the main environment's torch 2.13 is a CUDA build that fails to load
beside the CPU torch, and timm imports torchvision, so these run in ``.venv-vision`` (torch
2.14.1 with torchvision 0.29.1, see constraints-vision.txt). Elsewhere they are skipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gluon_optim as go
from _matrix import PRESETS, check_trains_and_round_trips, roles_of

timm = pytest.importorskip("timm", reason="timm/torchvision live in .venv-vision: make test-vision")
tv = pytest.importorskip("torchvision.models")

MODELS: dict[str, Callable[[], nn.Module]] = {
    "timm-vit": lambda: timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8
    ),
    "timm-resnet18": lambda: timm.create_model("resnet18", pretrained=False, num_classes=10),
    "timm-convnext": lambda: timm.create_model(
        "convnext_atto", pretrained=False, num_classes=10, ls_init_value=0.1
    ),
    "torchvision-resnet18": lambda: tv.resnet18(num_classes=10),
    "torchvision-vit": lambda: tv.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=10,
    ),
    "torchvision-mobilenet": lambda: tv.mobilenet_v3_small(num_classes=10),
}
EXPECTED: dict[str, dict[str, str]] = {
    "timm-vit": {
        "cls_token": "embedding",
        "pos_embed": "embedding",
        "patch_embed.proj.weight": "conv",
        "blocks.0.attn.qkv.weight": "hidden",
        "blocks.0.norm1.weight": "norm",
        "head.weight": "head",
        "head.bias": "bias",
    },
    "timm-resnet18": {"conv1.weight": "conv", "bn1.weight": "norm", "fc.weight": "head"},
    "timm-convnext": {
        "stem.1.weight": "norm",  # timm's LayerNorm2d
        "stages.0.blocks.0.gamma": "norm",  # layer scale
        "stages.0.blocks.0.mlp.fc1.weight": "conv",  # convnext_atto's MLP is 1x1 convs
        "head.fc.weight": "head",
    },
    "torchvision-resnet18": {
        "conv1.weight": "conv",
        "layer1.0.bn2.bias": "norm",
        "fc.weight": "head",
    },
    "torchvision-vit": {
        "class_token": "embedding",
        "encoder.pos_embedding": "embedding",
        "conv_proj.weight": "conv",
        "encoder.layers.encoder_layer_0.self_attention.in_proj_weight": "hidden",
        "heads.head.weight": "head",
    },
    "torchvision-mobilenet": {"features.0.0.weight": "conv", "classifier.3.weight": "head"},
}


def _loss(model: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    return F.cross_entropy(model(x), y)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_roles_with_the_plain_call(name: str) -> None:
    roles = roles_of(MODELS[name]())
    assert {n: roles[n] for n in EXPECTED[name]} == EXPECTED[name]


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_five_steps_reduce_the_loss_and_the_state_round_trips(name: str, preset: str) -> None:
    opt = check_trains_and_round_trips(MODELS[name], _loss, PRESETS[preset])
    assert all(n in go.describe(opt) for n in EXPECTED[name])


def test_timm_vit_positions_under_scion_are_read_per_position() -> None:
    opt = go.scion(MODELS["timm-vit"]())
    line = next(ln for ln in go.describe(opt).splitlines() if ln.startswith("pos_embed "))
    # (1, 17, 192) read as (192, 17): colnorm factor sqrt(d_out) = sqrt(192)
    assert "colnorm (T)" in line and f"{192**0.5:.4g}" in line


def test_timm_scheduler_drives_gluon_with_lr_scale() -> None:
    """timm's schedulers set lr = value * lr_scale on groups that carry it (layer decay)."""
    from timm.scheduler import CosineLRScheduler

    model = MODELS["timm-resnet18"]()
    groups = go.param_groups(model, "scion")
    groups[0]["lr_scale"] = 0.5
    opt = go.Gluon(groups, lr=0.00036)
    sched = CosineLRScheduler(opt, t_initial=10, warmup_t=0)
    _loss(model).backward()
    opt.step()
    sched.step(1)
    base = 0.00036 * (1 + math.cos(math.pi * 1 / 10)) / 2
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * base)
    assert opt.param_groups[1]["lr"] == pytest.approx(base)
