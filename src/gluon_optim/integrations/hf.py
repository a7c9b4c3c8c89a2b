"""Hugging Face ``Trainer`` with gluon-optim: roles from the model, exact two-point MVR.

Two ways in::

    from gluon_optim.integrations import hf

    # 1. Any Trainer: its weight-decay groups are replaced by the preset's role groups.
    trainer = Trainer(model, args, optimizer_cls_and_kwargs=hf.optimizer_cls_and_kwargs(
        model, "muon", lr=0.02))

    # 2. GluonTrainer: the same, plus the LMO group's lr in the logs and exact two-point
    #    variance reduction (gluon_mvr, limuon) with gradient accumulation.
    trainer = hf.GluonTrainer(model, args, preset="limuon", preset_options={"rank": 8})

``Trainer`` builds its own two parameter groups (with and without weight decay) and hands them
to the optimizer class; ``go.Gluon`` given those would lose every role. So the kwargs carry
``params=``, the preset's groups, which ``Trainer.create_optimizer`` uses instead of its own.
The learning-rate schedule of ``TrainingArguments`` (warm-up, decay) then scales every group's
own lr, as it does for any optimizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from gluon_optim import presets
from gluon_optim.integrations import lmo_group_index, unwrap
from gluon_optim.optimizer import Gluon

__all__ = ["GluonTrainer", "optimizer_cls_and_kwargs"]


def _check_preset(preset: str, who: str = "") -> None:
    if preset not in presets.PRESETS:
        raise ValueError(f"{who}preset {preset!r} is not one of {sorted(presets.PRESETS)}")


def build(model: nn.Module, preset: str, **options: Any) -> Gluon:
    """``go.<preset>(model, **options)``, with a clear error for an unknown preset."""
    _check_preset(preset)
    # Each name of presets.PRESETS is the factory function of the same name.
    factory: Any = getattr(presets, preset)
    optimizer: Gluon = factory(model, **options)
    return optimizer


def optimizer_cls_and_kwargs(
    model: nn.Module, preset: str = "muon", **options: Any
) -> tuple[type[Gluon], dict[str, Any]]:
    """``(Gluon, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

    The kwargs hold ``params=`` (the preset's role groups for ``model``, every setting filled
    in; ``Trainer`` uses them in place of its weight-decay groups), the default ``lr``, and the
    optimizer-level options given in ``options`` (``distributed``, ``process_group``).
    ``options`` are those of ``go.<preset>``; building the preset once here checks them.
    """
    built = build(model, preset, **options)
    kwargs: dict[str, Any] = {"params": built.param_groups, "lr": built.defaults["lr"]}
    kwargs.update({k: options[k] for k in presets.ENGINE_KEYS if k in options})
    return Gluon, kwargs


class GluonTrainer(Trainer):
    """A ``Trainer`` whose optimizer is a gluon-optim preset built from the model.

    Args:
        preset: ``"muon"`` (default), ``"scion"``, ``"unscion"``, ``"gluon"``,
            ``"gluon_mvr"`` or ``"limuon"``.
        preset_options: keyword options of ``go.<preset>`` (``lr``, ``roles``, ``settings``).
        *args, **kwargs: those of ``transformers.Trainer``. An ``optimizers=(opt, sched)``
            given there wins over ``preset``.

    Beyond the optimizer:

    * **Exact two-point steps** (``gluon_mvr`` and ``limuon`` with ``two_point="exact"``):
      each micro-batch is evaluated twice, first at the previous iterate inside
      ``opt.previous_iterate()`` and then at the current one, so with
      ``gradient_accumulation_steps > 1`` both gradients cover the same micro-batches.
      Dropout draws different masks in the two passes; set dropout to 0 for the paper's
      same-sample estimate.
    * **Logging**: the logged ``learning_rate`` is the first LMO group's, not the first group's
      (an AdamW embedding group under ``muon``).
    """

    def __init__(
        self,
        *args: Any,
        preset: str = "muon",
        preset_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        _check_preset(preset, "GluonTrainer: ")
        self.gluon_preset = preset
        self.gluon_options = dict(preset_options or {})
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            target = self.model if model is None else model
            if target is None:
                raise ValueError("GluonTrainer: no model to build the optimizer from")
            built = build(target, self.gluon_preset, **self.gluon_options)
            self._check_two_point(built)
            self.optimizer = built
        optimizer: torch.optim.Optimizer = self.optimizer
        return optimizer

    def _check_two_point(self, optimizer: Gluon) -> None:
        """Refuse gradient clipping with exact two-point steps (before anything changes)."""
        max_norm = self.args.max_grad_norm
        if optimizer.needs_closure() and max_norm is not None and max_norm > 0:
            raise ValueError(
                "GluonTrainer: the optimizer takes exact two-point steps, and "
                f"TrainingArguments.max_grad_norm={max_norm} would clip the gradient at the "
                "current iterate but not the one at the previous iterate, biasing the "
                "variance-reduced estimate; set max_grad_norm=0 (an LMO step's size does not "
                "depend on the gradient's norm), or two_point='approx'"
            )

    def training_step(self, model: nn.Module, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        optimizer = unwrap(self.optimizer)
        if optimizer.needs_closure():
            self._check_two_point(optimizer)  # also for an optimizer passed in optimizers=(...)
            # The same micro-batch at X^(k-1) first; its gradient accumulates in the
            # optimizer's state, and .grad is put back as it was.
            with optimizer.previous_iterate():
                # A copy: compute_loss may pop "labels" out of the dict it is given.
                first = dict(inputs) if isinstance(inputs, Mapping) else inputs
                super().training_step(model, first, *args, **kwargs)
        return super().training_step(model, inputs, *args, **kwargs)

    def _get_learning_rate(self) -> float:
        optimizer = unwrap(self.optimizer)
        index = lmo_group_index(optimizer)
        last = self.lr_scheduler.get_last_lr() if self.lr_scheduler is not None else None
        lr = last[index] if last else optimizer.param_groups[index]["lr"]
        return float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)
