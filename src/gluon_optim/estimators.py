"""Momentum estimators: the variance-reduced recursions of Gluon-MVR and LiMuon.

Each helper updates optimizer-owned buffers in place (hence the trailing underscore) and only
reads the gradients, so ``p.grad`` is never written. Notation: ``g = g_k(X^k)`` is the gradient
of batch ``k`` at the current iterate and ``g_prev`` its two-point partner: ``g_k(X^{k-1})``,
the SAME batch at the previous iterate (``two_point="exact"``), or the previous step's gradient
``g_{k-1}(X^{k-1})`` (``two_point="approx"``, as MARS-approx).

============== ==============================================================================
estimator      recursion (``beta`` = the group's ``momentum``)
============== ==============================================================================
``ema``        ``M <- beta M + (1 - beta) g``  (Gluon, Muon, Scion; in the optimizer itself)
``mvr1``       ``M <- g + beta (M - g_prev)``
``mvr2``       ``G <- g + (1 - q)(G - g_prev)``;  ``M <- beta M + (1 - beta) G``
``mvr3``       ``G`` as ``mvr2``;  ``M <- beta M + (1 - beta) G + beta (g - g_prev)``
               (our reconstruction, see :func:`mvr3_`)
``storm``      ``M <- g + (1 - beta)(M - g_prev)``  (LiMuon's convention: beta is small)
============== ==============================================================================

``storm_lowrank`` is ``storm`` applied to ``M_hat``, the rank-``r`` randomized SVD of the stored
momentum (:mod:`gluon_optim.lowrank`); the optimizer does the bookkeeping.

References: Qian, Rammal, Kovalev, Richtárik, "Muon is Provably Faster with Momentum Variance
Reduction", arXiv 2512.16598 (Gluon-MVR-1/2/3, Algorithms 2, 4, 5); Huang, Luo, Chen, "LiMuon",
arXiv 2509.14562 (Algorithm 1); Cutkosky and Orabona 2019 (STORM).
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["ESTIMATORS", "VR_ESTIMATORS", "mvr1_", "mvr2_", "mvr3_", "storm_"]

#: The variance-reduced estimators: each needs a two-point gradient ``g_prev``.
VR_ESTIMATORS: tuple[str, ...] = ("mvr1", "mvr2", "mvr3", "storm", "storm_lowrank")
#: Every value of the group key ``estimator``.
ESTIMATORS: tuple[str, ...] = ("ema", *VR_ESTIMATORS)


def mvr1_(m: Tensor, g: Tensor, g_prev: Tensor, beta: float) -> Tensor:
    """Gluon-MVR-1: ``m <- g + beta (m - g_prev)``, in place on ``m``; returns ``m``.

    With ``g_prev == g`` (a loss whose gradient does not depend on the point) this is the EMA
    ``beta m + (1 - beta) g``.
    """
    return m.sub_(g_prev).mul_(beta).add_(g)


def mvr2_(m: Tensor, est: Tensor, g: Tensor, g_prev: Tensor, beta: float, q: float) -> Tensor:
    """Gluon-MVR-2: ``est <- g + (1-q)(est - g_prev)``, then ``m <- beta m + (1-beta) est``.

    ``est`` is the variance-reduced gradient ``G`` (an MVR recursion with weight ``1 - q``) and
    ``m`` its EMA; both are updated in place. ``q = 1`` gives ``est = g``, plain EMA momentum.
    Returns ``m``.
    """
    mvr1_(est, g, g_prev, 1.0 - q)
    return m.lerp_(est, 1.0 - beta)


def mvr3_(m: Tensor, est: Tensor, g: Tensor, g_prev: Tensor, beta: float, q: float) -> Tensor:
    """Gluon-MVR-3, OUR RECONSTRUCTION: MVR-2 plus the correction ``beta (g - g_prev)``.

    ``est <- g + (1-q)(est - g_prev)``;  ``m <- beta m + (1-beta) est + beta (g - g_prev)``.

    No source we could read states Algorithm 5 of arXiv 2512.16598; summaries say only that it
    adds a correction term ``beta(...)`` on top of MVR-2's momentum update. The form above is a
    reconstruction, not the paper's text. The obvious alternative, with the raw gradient ``g``
    in place of ``est`` (``beta m + (1-beta) g + beta (g - g_prev)``), is algebraically MVR-1,
    so it cannot be a third method. With ``q = 1`` this form reduces to MVR-1 as well.
    Returns ``m``.
    """
    mvr1_(est, g, g_prev, 1.0 - q)
    return m.lerp_(est, 1.0 - beta).add_(g, alpha=beta).sub_(g_prev, alpha=beta)


def storm_(m: Tensor, g: Tensor, g_prev: Tensor, beta: float) -> Tensor:
    """STORM / LiMuon option 1: ``m <- g + (1 - beta)(m - g_prev)``, in place; returns ``m``.

    Here ``beta`` is LiMuon's (small, the weight of the fresh gradient), so ``storm_`` with
    ``beta`` is exactly :func:`mvr1_` with ``1 - beta``.
    """
    return mvr1_(m, g, g_prev, 1.0 - beta)
