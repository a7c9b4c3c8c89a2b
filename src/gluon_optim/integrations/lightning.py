"""Lightning with gluon-optim: a callback that refuses what would make a step silently wrong.

Needs the ``lightning`` package (``lightning.pytorch``).

``configure_optimizers`` returns a preset as it would any optimizer::

    def configure_optimizers(self):
        return go.gluon_mvr(self, variant=2, lr=0.02)

    def configure_callbacks(self):
        return [GluonCallback()]

Lightning's automatic optimisation calls ``optimizer.step(closure)``, which is all an exact
two-point step needs: Gluon calls the closure at ``X^{k-1}`` and then at ``X^k``. So
``training_step`` runs twice per step; skip logging on the first call with
``if not go.unwrap(self.optimizers()).in_previous_iterate: self.log(...)``.

Three Lightning features cannot be combined with exact two-point steps, and
:class:`GluonCallback` raises at the start of ``fit`` when it sees one:

* ``accumulate_grad_batches > 1``: Lightning runs the closure for the LAST micro-batch only,
  so the gradient at the previous iterate would cover one micro-batch and the one at the
  current iterate all of them.
* a gradient scaler (``precision="16-mixed"``): ``GradScaler.step`` calls
  ``optimizer.step()`` without the closure.
* gradient clipping (``gradient_clip_val``): each of the two closure calls would be clipped by
  its own norm, so their difference is no longer a gradient difference.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback

from gluon_optim.integrations import unwrap
from gluon_optim.optimizer import Gluon

__all__ = ["GluonCallback", "gluon_optimizers"]


def gluon_optimizers(trainer: Any) -> list[Gluon]:
    """The :class:`~gluon_optim.Gluon` optimizers among ``trainer.optimizers``."""
    out: list[Gluon] = []
    for optimizer in trainer.optimizers:
        try:
            out.append(unwrap(optimizer))
        except TypeError:
            continue
    return out


class GluonCallback(Callback):
    """Checks, when ``fit`` starts, that Lightning's settings suit the Gluon optimizers.

    Raises ``ValueError`` naming the setting when an exact two-point optimizer meets
    ``accumulate_grad_batches > 1``, a gradient scaler or gradient clipping (module docstring).
    """

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        exact = [opt for opt in gluon_optimizers(trainer) if opt.needs_closure()]
        if not exact:
            return
        why = "the optimizer takes exact two-point steps (a variance-reduced estimator with "
        why += "two_point='exact')"
        fix = "; or use two_point='approx'"
        if trainer.accumulate_grad_batches > 1:
            raise ValueError(
                f"GluonCallback: accumulate_grad_batches={trainer.accumulate_grad_batches}, but "
                f"{why}: Lightning's closure evaluates only the last micro-batch at the previous "
                f"iterate. Use accumulate_grad_batches=1 with a larger batch{fix}"
            )
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                f"GluonCallback: precision={trainer.precision!r} uses a gradient scaler, but "
                f"{why}: GradScaler.step calls optimizer.step() without the closure. Use "
                f"precision='bf16-mixed' or '32-true'{fix}"
            )
        if trainer.gradient_clip_val:
            raise ValueError(
                f"GluonCallback: gradient_clip_val={trainer.gradient_clip_val}, but {why}: the "
                "two gradients of a step would be clipped by different factors. Set "
                f"gradient_clip_val=None (an LMO step's size does not depend on the gradient's "
                f"norm){fix}"
            )
