"""Momentum estimators: the EMA of Gluon and the variance-reduced recursions of Gluon-MVR, LiMuon.

The optimizer's estimator stage never names an estimator: it looks the group's ``estimator`` up
in :data:`ESTIMATORS` and calls the entry. Each :class:`Estimator` declares what the optimizer
needs to know about it: its per-parameter state keys, its own settings, whether it needs the
two-point gradient ``g_prev``, how its first step starts the state, and how a later step
advances it.

Notation: ``g = g_k(X^k)`` is the gradient of batch ``k`` at the current iterate, ``beta`` the
group's ``momentum`` (everywhere the weight of the OLD momentum), and ``g_prev`` the two-point
partner: ``g_k(X^{k-1})``, the SAME batch at the previous iterate (``two_point="exact"``), or
the previous step's gradient ``g_{k-1}(X^{k-1})`` (``two_point="approx"``).

================= ===========================================================================
estimator         recursion
================= ===========================================================================
``ema``           ``M <- beta M + (1 - beta) g`` (Gluon, Muon, Scion); ``M`` starts at zero
``mvr1``          ``M <- g + beta (M - g_prev)`` (Gluon-MVR-1; LiMuon option 1 / STORM with
                  LiMuon's ``beta_L = 1 - beta``)
``mvr2``          ``G <- g + (1 - q)(G - g_prev)``;  ``M <- beta M + (1 - beta) G``
``mvr3``          ``G`` as ``mvr2``;  ``M <- beta M + (1 - beta) G + beta (g - g_prev)``
                  (our reconstruction, see :func:`mvr3_`)
``storm_lowrank`` ``mvr1`` on ``M_hat``, the stored rank-``r`` randomized SVD of ``M`` (LiMuon
                  option 2, :mod:`gluon_optim.lowrank`)
``mars``          ``c = g + gamma beta / (1 - beta) (g - g_prev)``;  ``M <- beta M + (1 - beta) c``
                  (MARS; ``gamma = mars_gamma``), see :func:`mars_`
================= ===========================================================================

The variance-reduced estimators start at ``M^0 = G^0 = g^0``, as their papers do.

The pure recursions (:func:`mvr1_`, :func:`mvr2_`, :func:`mvr3_`) update optimizer-owned
buffers in place (hence the trailing underscore) and only read the gradients, so ``p.grad`` is
never written.

References: Qian, Rammal, Kovalev, Richtárik, "Muon is Provably Faster with Momentum Variance
Reduction", arXiv 2512.16598 (Gluon-MVR-1/2/3, Algorithms 2, 4, 5); Huang, Luo, Chen, "LiMuon",
arXiv 2509.14562 (Algorithm 1); Cutkosky and Orabona 2019 (STORM); Riabinin et al., "Gluon",
arXiv 2505.13416 (Algorithm 1); Yuan, Liu, Wu, Zhou, Gu, "MARS: Unleashing the Power of
Variance Reduction for Training Large Models", arXiv 2411.10438 (Algorithm 1 and MARS-approx).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gluon_optim import lowrank as _lowrank
from gluon_optim.settings import Choice, Flag, Integer, Number, Setting

__all__ = [
    "APPROX_REDUCES_TO",
    "ESTIMATORS",
    "VR_ESTIMATORS",
    "Estimator",
    "approx_reduction",
    "EstimatorStep",
    "mvr1_",
    "mvr2_",
    "mvr3_",
    "mars_",
]


# -- the recursions -------------------------------------------------------------------------
def mvr1_(m: Tensor, g: Tensor, g_prev: Tensor, beta: float) -> Tensor:
    """Gluon-MVR-1: ``m <- g + beta (m - g_prev)``, in place on ``m``; returns ``m``.

    With ``g_prev == g`` (a loss whose gradient does not depend on the point) this is the EMA
    ``beta m + (1 - beta) g``. It is also STORM / LiMuon option 1 in their convention, where
    the small weight of the fresh gradient is ``1 - beta``.
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


def mars_(m: Tensor, g: Tensor, g_prev: Tensor, beta: float, gamma: float) -> Tensor:
    """MARS: ``m <- beta m + (1 - beta) c`` with ``c = g + gamma beta / (1 - beta) (g - g_prev)``.

    Expanded, ``m <- beta m + (1 - beta) g + gamma beta (g - g_prev)``, which is how it is
    computed (no division, so ``beta = 0`` is plain ``m = g``). ``gamma`` scales the
    variance-reduction correction: ``gamma = 0`` is the EMA of the gradients, ``gamma = 1`` is
    MVR-1 (``g + beta (m - g_prev)``). With ``g_prev`` the previous step's gradient (MARS-approx,
    ``two_point="approx"``) and ``gamma = 1`` the recursion telescopes to ``m = g``, which is why
    MARS damps it: its code defaults to ``gamma = 0.025``. In place on ``m``; returns ``m``.

    Differences from MARS's code, on purpose: the state starts at ``m^0 = g^0`` like our other
    variance-reduced estimators (MARS starts ``m`` at zero), and ``c`` is not clipped to norm 1
    (MARS clips optionally; the LMO that follows is scale invariant, the EMA is not, so clipping
    would change the weights of old and new gradients).
    """
    return m.lerp_(g, 1.0 - beta).add_(g, alpha=gamma * beta).sub_(g_prev, alpha=gamma * beta)


# -- the table --------------------------------------------------------------------------------
@dataclass(frozen=True)
class EstimatorStep:
    """What an estimator sees of one parameter on one step.

    Attributes:
        p: the parameter, at ``X^k`` (read only: the estimator stage never changes it).
        g: its gradient ``g_k(X^k)`` (read only).
        g_prev: the two-point partner (``g`` itself when the estimator needs none, or when a
            configuration change mid-run left no partner for this one step).
        state: the parameter's optimizer state; the estimator owns its declared keys.
        k: 0-based index of this parameter's step.
        index: the parameter's position in its group (seeds LiMuon's sketch).
        beta: the momentum weight of this step (the group's, or the radius policy's schedule).
        scheduled: whether ``beta`` comes from a radius policy's momentum schedule.
        group: the group's settings (read only).
    """

    p: Tensor
    g: Tensor
    g_prev: Tensor
    state: MutableMapping[str, Any]
    k: int
    index: int
    beta: float
    scheduled: bool
    group: Mapping[str, Any]


Advance = Callable[[EstimatorStep], Tensor]
# A whole group at once: the steps, the common beta; returns their momenta.
AdvanceMany = Callable[[list[EstimatorStep], float], list[Tensor]]


@dataclass(frozen=True)
class Estimator:
    """One momentum estimator, as the optimizer's estimator stage uses it.

    Attributes:
        name: the value of the group key ``estimator``.
        doc: one line for the docs table.
        state: per-parameter state keys it owns (besides ``"step"`` and the two-point key).
        settings: the group settings only it (or its family) reads.
        two_point: whether each step needs ``g_prev`` (the two-point gradient protocol,
            :mod:`gluon_optim.two_point`).
        start: the first step, when ``state`` does not hold every key yet: create them and
            return ``M^0``.
        advance: a later step: update the state in place and return ``M^k``.
        advance_many: the same as ``advance`` for a whole group in multi-tensor kernels (the
            ``foreach`` setting), when the estimator has such a form.
        matrix_only: it needs matrices (2-D, or kernels flattened to 2-D).
        whole_state: for a state that is not elementwise, the shapes of its keys given the
            parameter's shape and group; such a state is held whole (the same on every rank
            of a distributed run) and the estimator runs on the owner. ``None``: every state
            key is shaped like the parameter.
        follows_schedule: it takes its ``beta`` from a radius policy's momentum schedule.
        kept: the keys of :attr:`state` that every step leaves, given the group and whether
            ``beta`` is scheduled, when that is fewer than all of them (the EMA keeps no buffer
            at ``momentum=0``). ``None``: every key. ``load_state_dict`` refuses a started state
            that lacks one of them, which the step would otherwise silently restart.
    """

    name: str
    doc: str
    state: tuple[str, ...]
    settings: tuple[Setting, ...]
    two_point: bool
    start: Advance
    advance: Advance
    advance_many: AdvanceMany | None = None
    matrix_only: bool = False
    whole_state: Callable[[Sequence[int], Mapping[str, Any]], dict[str, tuple[int, ...]]] | None = (
        None
    )
    follows_schedule: bool = False
    kept: Callable[[Mapping[str, Any], bool], tuple[str, ...]] | None = None

    def ready(self, state: Mapping[str, Any]) -> bool:
        """Whether ``state`` holds every key of this estimator (so the next step advances)."""
        return all(key in state for key in self.state)

    def kept_state(self, group: Mapping[str, Any], scheduled: bool) -> tuple[str, ...]:
        """The state keys a parameter holds after any step of ``group`` (see :attr:`kept`)."""
        return self.state if self.kept is None else self.kept(group, scheduled)

    def update(self, step: EstimatorStep) -> Tensor:
        """``M^k`` for this step: :attr:`start` on the first, :attr:`advance` afterwards."""
        return self.advance(step) if self.ready(step.state) else self.start(step)


def _ema_buffer(s: EstimatorStep) -> tuple[Tensor, bool]:
    """The EMA buffer of ``s.state`` and whether this step must still average ``g`` into it.

    Created on first use: at zero (``momentum_init="zero"``, as torch.optim.Muon; the first
    average then gives ``(1 - beta) g``), or as ``g`` itself (``"gradient"``: Gluon's
    ``M^0 = g^0``, already this step's momentum).
    """
    state = s.state
    if "momentum_buffer" in state:
        buf: Tensor = state["momentum_buffer"]
        return buf, True
    if s.group["momentum_init"] == "gradient":
        state["momentum_buffer"] = s.g.clone(memory_format=torch.preserve_format)
        return state["momentum_buffer"], False
    state["momentum_buffer"] = torch.zeros_like(s.g, memory_format=torch.preserve_format)
    return state["momentum_buffer"], True


def _ema_keeps_buffer(beta: float, scheduled: bool) -> bool:
    # beta = 0 keeps no buffer (M = g), unless a schedule sets beta: its buffer must exist
    # from its first step on, where beta^0 = 0.
    return beta != 0.0 or scheduled


def _ema_kept(group: Mapping[str, Any], scheduled: bool) -> tuple[str, ...]:
    return ("momentum_buffer",) if _ema_keeps_buffer(group["momentum"], scheduled) else ()


def _ema(s: EstimatorStep) -> Tensor:
    if not _ema_keeps_buffer(s.beta, s.scheduled):
        return s.g
    buf, average = _ema_buffer(s)
    if average:
        buf.lerp_(s.g, 1.0 - s.beta)
    # Nesterov as torch.optim.Muon: g + beta (M - g), built out of place so that p.grad is never
    # written (KellerJordan/Muon's in-place lerp_ overwrites it).
    return s.g.lerp(buf, s.beta) if s.group["nesterov"] else buf


def _ema_many(steps: list[EstimatorStep], beta: float) -> list[Tensor]:
    # One multi-tensor kernel per operation instead of one kernel per parameter.
    grads = [s.g for s in steps]
    if beta == 0.0:
        return grads
    made = [_ema_buffer(s) for s in steps]
    bufs = [buf for buf, _ in made]
    averaged = [(buf, s.g) for (buf, average), s in zip(made, steps, strict=True) if average]
    if averaged:
        torch._foreach_lerp_([b for b, _ in averaged], [g for _, g in averaged], 1.0 - beta)
    return list(torch._foreach_lerp(grads, bufs, beta)) if steps[0].group["nesterov"] else bufs


def _copy_gradient(*keys: str) -> Advance:
    """A first step that sets every key in ``keys`` to a copy of ``g``; returns the first key."""

    def start(s: EstimatorStep) -> Tensor:
        for key in keys:
            s.state[key] = s.g.clone(memory_format=torch.preserve_format)
        out: Tensor = s.state[keys[0]]
        return out

    return start


def _mvr1(s: EstimatorStep) -> Tensor:
    return mvr1_(s.state["momentum_buffer"], s.g, s.g_prev, s.beta)


def _mvr2(s: EstimatorStep) -> Tensor:
    m, est = s.state["momentum_buffer"], s.state["mvr_estimate"]
    return mvr2_(m, est, s.g, s.g_prev, s.beta, s.group["mvr_q"])


def _mvr3(s: EstimatorStep) -> Tensor:
    m, est = s.state["momentum_buffer"], s.state["mvr_estimate"]
    return mvr3_(m, est, s.g, s.g_prev, s.beta, s.group["mvr_q"])


def _mars(s: EstimatorStep) -> Tensor:
    return mars_(s.state["momentum_buffer"], s.g, s.g_prev, s.beta, s.group["mars_gamma"])


def _store_lowrank(s: EstimatorStep, m: Tensor) -> Tensor:
    """Keep the rank-``r`` randomized SVD of ``m`` as the state; return ``m`` for this step."""
    rows = s.p.shape[0]
    u, sv, v = _lowrank.rsvd(
        m.reshape(rows, s.p.numel() // rows),
        s.group["rank"],
        oversampling=s.group["oversampling"],
        seed=_lowrank.sketch_seed(s.group["rsvd_seed"], s.k, s.index, s.group["role"]),
    )
    dtype = s.p.dtype
    s.state["lowrank_u"], s.state["lowrank_s"], s.state["lowrank_v"] = (
        u.to(dtype),
        sv.to(dtype),
        v.to(dtype),
    )
    return m


def _lowrank_shapes(shape: Sequence[int], group: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The factors' shapes for a parameter of ``shape`` read as ``(m, n)``: ``U`` ``(m, k)``,
    ``S`` ``(k,)``, ``V`` ``(n, k)``, with ``k = min(rank, m, n)`` as :func:`lowrank.rsvd`."""
    m = shape[0]
    n = math.prod(shape) // m
    k = min(group["rank"], m, n)
    return {"lowrank_u": (m, k), "lowrank_s": (k,), "lowrank_v": (n, k)}


def _lowrank_start(s: EstimatorStep) -> Tensor:
    return _store_lowrank(s, s.g.clone())


def _lowrank_advance(s: EstimatorStep) -> Tensor:
    m = _lowrank.reconstruct(
        s.state["lowrank_u"], s.state["lowrank_s"], s.state["lowrank_v"]
    ).reshape(s.p.shape)
    return _store_lowrank(s, mvr1_(m, s.g, s.g_prev, s.beta))


# -- settings only the estimators read ------------------------------------------------------------
NESTEROV = Setting(
    "nesterov", False, Flag(), ("ema",), "Nesterov momentum as torch.optim.Muon: `g + beta (M - g)`"
)
MOMENTUM_INIT = Setting(
    "momentum_init",
    "zero",
    Choice(("zero", "gradient")),
    ("ema",),
    "the EMA's start: `zero` (torch.optim.Muon, Scion's code) or `gradient` (`M^0 = g^0`, as "
    "Gluon's Algorithm 1 and the variance-reduced estimators)",
)
TWO_POINT = Setting(
    "two_point",
    "exact",
    Choice(("exact", "approx")),
    ("mvr1", "mvr2", "mvr3", "storm_lowrank", "mars"),
    "where `g_prev` comes from: `exact` = this batch at the previous iterate (two gradients per "
    "step); `approx` = the previous step's gradient",
)
ALLOW_DEGENERATE = Setting(
    "allow_degenerate",
    False,
    Flag(),
    ("mvr1", "mvr2", "mvr3"),
    "run `two_point='approx'` although it reduces MVR-1/2/3 to a simpler method (refused "
    "otherwise); for tests and ablations that show the reduction",
)
#: What each MVR recursion is with ``two_point="approx"`` (tested to rounding): with the previous
#: step's gradient as ``g_prev`` and ``M^0 = G^0 = g^0``, the correction telescopes away.
APPROX_REDUCES_TO: dict[str, str] = {
    "mvr1": "no momentum at all (M = g, for every momentum)",
    "mvr2": "the EMA started at g^0 (estimator='ema', momentum_init='gradient'), for every mvr_q",
    "mvr3": "estimator='mars' with mars_gamma=1, for every mvr_q",
}


def approx_reduction(estimator: str) -> str:
    """Why ``two_point="approx"`` is no variance reduction for ``estimator`` (a key of
    :data:`APPROX_REDUCES_TO`): the sentence the ``gluon_mvr`` preset and a group's check share."""
    return (
        f"two_point='approx' is not variance reduction for MVR-{estimator[-1]}: with the "
        "previous step's gradient as g_prev and M^0 = g^0 the recursion reduces to "
        f"{APPROX_REDUCES_TO[estimator]} (docs/variance_reduction.md)"
    )


MVR_Q = Setting(
    "mvr_q",
    0.1,
    Number(0.0, 1.0),
    ("mvr2", "mvr3"),
    "`q` of `G <- g + (1 - q)(G - g_prev)`",
    per_step=True,
)
MARS_GAMMA = Setting(
    "mars_gamma",
    0.025,
    Number(0.0, 1.0),
    ("mars",),
    "`gamma`, the scale of MARS's correction (0: EMA; 1: MVR-1)",
    per_step=True,
)
_LOWRANK = ("storm_lowrank",)
LOWRANK_SETTINGS = (
    Setting("rank", 8, Integer(lo=1), _LOWRANK, "rank `r` of the stored momentum (<= min(m, n))"),
    Setting("oversampling", 5, Integer(lo=0), _LOWRANK, "extra randomized-SVD sketch columns"),
    Setting(
        "rsvd_seed", 0, Integer(), _LOWRANK, "base seed of the sketch (mixed with step, index)"
    ),
)


def _recursive(
    name: str, doc: str, state: tuple[str, ...], settings: tuple[Setting, ...], advance: Advance
) -> Estimator:
    """A variance-reduced estimator that starts every state key at ``g^0``."""
    return Estimator(name, doc, state, settings, True, _copy_gradient(*state), advance)


_M, _MG = ("momentum_buffer",), ("momentum_buffer", "mvr_estimate")

#: Every estimator by the value of the group key ``estimator``.
ESTIMATORS: dict[str, Estimator] = {
    e.name: e
    for e in [
        Estimator(
            "ema",
            "`M <- beta M + (1 - beta) g`, from `M = 0` or `M = g^0` (Gluon, Muon, Scion)",
            state=("momentum_buffer",),
            settings=(NESTEROV, MOMENTUM_INIT),
            two_point=False,
            start=_ema,
            advance=_ema,
            advance_many=_ema_many,
            follows_schedule=True,
            kept=_ema_kept,
        ),
        _recursive(
            "mvr1",
            "`M <- g + beta (M - g_prev)` (Gluon-MVR-1; LiMuon option 1)",
            _M,
            (TWO_POINT, ALLOW_DEGENERATE),
            _mvr1,
        ),
        _recursive(
            "mvr2",
            "`G <- g + (1 - q)(G - g_prev)`, `M <- beta M + (1 - beta) G` (Gluon-MVR-2)",
            _MG,
            (TWO_POINT, ALLOW_DEGENERATE, MVR_Q),
            _mvr2,
        ),
        _recursive(
            "mvr3",
            "MVR-2 plus `beta (g - g_prev)` (Gluon-MVR-3, our reconstruction)",
            _MG,
            (TWO_POINT, ALLOW_DEGENERATE, MVR_Q),
            _mvr3,
        ),
        Estimator(
            "storm_lowrank",
            "`mvr1` on the stored rank-`r` randomized SVD of `M` (LiMuon option 2)",
            state=("lowrank_u", "lowrank_s", "lowrank_v"),
            settings=(TWO_POINT, *LOWRANK_SETTINGS),
            two_point=True,
            start=_lowrank_start,
            advance=_lowrank_advance,
            matrix_only=True,
            whole_state=_lowrank_shapes,
        ),
        _recursive(
            "mars",
            "`M <- beta M + (1 - beta) g + gamma beta (g - g_prev)` (MARS; `gamma = mars_gamma`)",
            _M,
            (TWO_POINT, MARS_GAMMA),
            _mars,
        ),
    ]
}

#: State keys held whole (not shaped like the parameter): LiMuon's low-rank factors. Under FSDP2
#: they are the same, whole, on every rank.
WHOLE_STATE: frozenset[str] = frozenset(
    key for e in ESTIMATORS.values() if e.whole_state is not None for key in e.state
)

#: The variance-reduced estimators: each needs a two-point gradient ``g_prev``.
VR_ESTIMATORS: tuple[str, ...] = tuple(n for n, e in ESTIMATORS.items() if e.two_point)

#: Estimator names of earlier versions, with what replaces them.
RENAMED: dict[str, str] = {
    "storm": (
        "'mvr1': since 0.2.0 `momentum` is the weight of the old momentum for every estimator, "
        "so STORM / LiMuon option 1 with LiMuon's beta b is estimator='mvr1' with "
        "momentum=1-b (go.limuon(..., beta=b) converts it)"
    ),
}
