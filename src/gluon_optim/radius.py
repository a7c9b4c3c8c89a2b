"""Radius (step size) policies: ``t_i^k = lr * scale * rho``, by the group key ``radius_policy``.

The optimizer's radius stage never names a policy: it looks the group's ``radius_policy`` up in
:data:`POLICIES`. Each :class:`RadiusPolicy` declares its settings, the radius of one step, and
optionally a momentum schedule that overrides ``beta`` for estimators that follow one.

============== ==============================================================================
policy         radius ``t`` of step ``k`` (``t0 = lr * scale``)
============== ==============================================================================
``constant``   ``t0``
``l0l1``       ``t0 * ||G||_* / (L0 + L1 ||G||_*)``, ``G`` the gradient (Gluon Theorem 1) or
               the momentum (``radius_source="momentum"``: an option, not analysed there)
``theory_decay`` ``t0 * (k + 1)^(-3/4)`` with ``beta^k = 1 - (k + 1)^(-1/2)`` (Theorem 2)
============== ==============================================================================

With ``L0 ~ 0`` the ``l0l1`` radius is ``t0 / L1``: the fitted ``(L0, L1)`` of
:mod:`gluon_optim.smoothness` give it directly (``lr=1``, ``scale=1``).

Reference: Riabinin et al., "Gluon: Making Muon & Scion Great Again!", arXiv 2505.13416,
Theorems 1 and 2.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from gluon_optim.norms import Norm
from gluon_optim.settings import Choice, Number, Setting

__all__ = ["POLICIES", "RadiusInput", "RadiusPolicy"]


@dataclass(frozen=True)
class RadiusInput:
    """What a policy may look at for one parameter on one step.

    Attributes:
        t0: ``lr * scale`` (a float, or a tensor when ``lr`` is one).
        k: 0-based index of the parameter's step.
        g: the gradient, shaped like the parameter.
        operand: the momentum as the norm reads it (:meth:`Norm.operand`).
        direction: ``D`` of ``lmo(M) = -factor * D``, shaped like ``operand``.
        factor: the norm's LMO factor for this shape.
        norm: the parameter's norm.
        group: the group's settings.
        dual: the dual norm the policy asked for (:attr:`RadiusPolicy.dual`), computed by the
            direction stage, else ``None``.
    """

    t0: float | Tensor
    k: int
    g: Tensor
    operand: Tensor
    direction: Tensor
    factor: float
    norm: Norm
    group: Mapping[str, Any]
    dual: Tensor | None = None


def _no_dual(group: Mapping[str, Any]) -> None:
    return None


@dataclass(frozen=True)
class RadiusPolicy:
    """A step-size policy.

    Attributes:
        name: the value of the group key ``radius_policy``.
        doc: one line for the docs table.
        settings: the group settings only it reads.
        radius: the radius ``t`` of one parameter's step.
        momentum: ``beta`` of step ``k``, overriding the group's ``momentum`` for estimators
            that follow a schedule (``ema``); ``None`` keeps the group's.
        dual: which dual norm a group's radius needs: ``"gradient"`` (``||g||_*``),
            ``"momentum"`` (``||M||_*``) or ``None``. Dual norms are whole-tensor operations
            (another Newton–Schulz for the spectral norms), so the direction stage computes
            them with the direction, once, wherever the direction is computed.
    """

    name: str
    doc: str
    settings: tuple[Setting, ...]
    radius: Callable[[RadiusInput], float | Tensor]
    momentum: Callable[[int], float] | None = None
    dual: Callable[[Mapping[str, Any]], Literal["gradient", "momentum"] | None] = _no_dual


def _l0l1(r: RadiusInput) -> Tensor:
    dual = r.dual
    assert dual is not None, "the direction stage computes the dual norm for l0l1"
    # With L0 = 0 a zero gradient would make 0/0; the clamp keeps the step exactly 0.
    denom = (r.group["l0"] + r.group["l1"] * dual).clamp(min=torch.finfo(dual.dtype).tiny)
    radius: Tensor = r.t0 * dual / denom
    return radius


_L0L1 = ("l0l1",)
L0L1_SETTINGS = (
    Setting("l0", 0.0, Number(0.0), _L0L1, "`L0` of the layer's (L0, L1)-smoothness", True),
    Setting("l1", 1.0, Number(0.0), _L0L1, "`L1` of the layer's (L0, L1)-smoothness", True),
    Setting(
        "radius_source",
        "gradient",
        Choice(("gradient", "momentum")),
        _L0L1,
        "whose dual norm enters the radius: the `gradient` (Theorem 1) or the `momentum`",
    ),
)

#: Every radius policy by the value of the group key ``radius_policy``.
POLICIES: dict[str, RadiusPolicy] = {
    p.name: p
    for p in [
        RadiusPolicy("constant", "`t = lr * scale`", (), lambda r: r.t0),
        RadiusPolicy(
            "l0l1",
            "`t = lr * scale * ||G||_* / (L0 + L1 ||G||_*)` (Gluon Theorem 1)",
            L0L1_SETTINGS,
            _l0l1,
            dual=lambda group: group["radius_source"],
        ),
        RadiusPolicy(
            "theory_decay",
            "`t = lr * scale * (k+1)^(-3/4)`, EMA `beta = 1 - (k+1)^(-1/2)` (Gluon Theorem 2)",
            (),
            lambda r: r.t0 * (r.k + 1) ** -0.75,
            momentum=lambda k: 1.0 - (k + 1) ** -0.5,
        ),
    ]
}
