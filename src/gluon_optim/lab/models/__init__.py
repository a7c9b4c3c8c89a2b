"""The lab's models by preset name: a GPT for text, a CNN and a ViT for images.

::

    from gluon_optim.lab.models import build_model, model_task
    model = build_model("gpt-tiny", vocab_size=256, rope=True)   # config fields as overrides
    model_task("gpt-tiny")                                       # "lm"

Every model exposes ``head`` (its output ``nn.Linear``) and ``embedding`` (the token
``nn.Embedding``, or ``None``), and every trainable parameter sits in a module type that
:func:`gluon_optim.assign_roles` covers, so ``go.muon(model)`` / ``go.scion(model)`` need no
role arguments.

* ``gpt-tiny`` (lm): 2 layers, 2 heads, width 64, block 64, untied, learned positions; a CPU
  smoke-test size.
* ``gpt-small`` (lm): 6 layers, 6 heads, width 384, block 256; a laptop-sized run.
* ``moe-tiny`` (lm): ``gpt-tiny`` with each MLP a top-2 mixture of 4 gated experts stored as
  stacks (Mixtral's layout), for the per-expert step.
* ``gpt2-124m`` (lm): 12 layers, 12 heads, width 768, block 1024, vocab 50304, tied; the GPT-2
  small shape of the Muon/Scion/Gluon papers, meant for GPUs.
* ``cnn-small`` (image): airbench-style, a 32-channel stem then groups of 32, 64, 128 channels.
* ``vit-tiny`` (image): width 64, depth 4, 4 heads, patch 4 (pass ``patch_size=2`` for 8x8
  images).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from gluon_optim.lab.models.cnn import CNN, CNNConfig
from gluon_optim.lab.models.gpt import GPT, GPTConfig
from gluon_optim.lab.models.vit import ViT, ViTConfig

__all__ = [
    "CNN",
    "GPT",
    "MODELS",
    "CNNConfig",
    "GPTConfig",
    "ModelConfig",
    "ModelSpec",
    "ViT",
    "ViTConfig",
    "build_model",
    "model_config",
    "model_task",
]

ModelConfig = GPTConfig | CNNConfig | ViTConfig
Task = Literal["lm", "image"]


@dataclass(frozen=True)
class ModelSpec:
    """A preset: its task (``"lm"`` or ``"image"``) and its default config."""

    task: Task
    config: ModelConfig


MODELS: dict[str, ModelSpec] = {
    "gpt-tiny": ModelSpec(
        "lm", GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64, tied=False, rope=False)
    ),
    "gpt-small": ModelSpec("lm", GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384)),
    "moe-tiny": ModelSpec(
        "lm",
        GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64, tied=False, n_expert=4, top_k=2),
    ),
    "gpt2-124m": ModelSpec(
        "lm",
        # 50304 = 50257 rounded up to a multiple of 64, as nanoGPT does for faster matmuls.
        GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768, tied=True),
    ),
    "cnn-small": ModelSpec("image", CNNConfig()),
    "vit-tiny": ModelSpec("image", ViTConfig(dim=64, depth=4, heads=4, patch_size=4)),
}


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}") from None


def model_task(name: str) -> Task:
    """The task of preset ``name``: ``"lm"`` (token ids in, next-token logits out) or
    ``"image"`` (images in, class logits out)."""
    return _spec(name).task


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """The config of preset ``name`` with ``overrides`` applied (a new object; presets stay).

    Raises:
        ValueError: ``name`` is not a preset, an override is not a field of its config, or the
            resulting config is invalid.
    """
    config = _spec(name).config
    fields = [f.name for f in dataclasses.fields(config)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(
            f"model {name!r} ({type(config).__name__}) has no field(s) {', '.join(unknown)}; "
            f"valid overrides: {', '.join(fields)}"
        )
    return dataclasses.replace(config, **overrides)


def build_model(name: str, **overrides: Any) -> nn.Module:
    """A freshly initialised model of preset ``name``, with config fields overridden by keyword.

    Example: ``build_model("gpt-tiny", vocab_size=256, n_layer=3, tied=True, rope=True)``.

    Raises:
        ValueError: as :func:`model_config`.
    """
    config = model_config(name, **overrides)
    if isinstance(config, GPTConfig):
        return GPT(config)
    if isinstance(config, CNNConfig):
        return CNN(config)
    return ViT(config)
