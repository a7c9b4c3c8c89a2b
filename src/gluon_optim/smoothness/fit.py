r"""The penalised (L0, L1) fit of trajectory-smoothness measurements: pure math on floats.

Gluon's Assumption 1 (Riabinin et al., "Gluon: Making Muon & Scion Great Again!",
arXiv 2505.13416, Section 5) bounds, for every layer ``i`` in its own norm pair,
``||grad_i f(X) - grad_i f(Y)||_(i)* <= (L0_i + L1_i ||grad_i f(X)||_(i)*) ||X_i - Y_i||_(i)``.
Given measurements ``L_hat_k`` of the left-hand ratio and ``G_k = ||g^{k+1}||_*`` (from
:class:`~gluon_optim.smoothness.SmoothnessProbe` or any two arrays), this module fits the line
``L_hat ~ L0 + L1 G`` with the paper's penalty on under-estimation, over ``L0, L1 >= lower``:

.. math::
    \min \sum_k \bigl(\hat L_k - L_0 - L_1 G_k\bigr)^2
         + \lambda \sum_k \max\bigl(0,\ \hat L_k - L_0 - L_1 G_k\bigr)^2

(the paper's Eq. 30, ``lambda = 5``, bounds ``(1e-6, None)``). The objective is convex and
piecewise quadratic in two variables and is minimised exactly: Newton on the residuals' sign
pattern with exact line searches, then exact searches along the two bounds.

Plain Python floats throughout (no torch); inputs may be lists, arrays or 1-D tensors.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Data", "Fit", "bootstrap_fit", "fit_l0_l1", "fit_records", "radius_dependence"]


@dataclass(frozen=True)
class Fit:
    r"""A fit of ``L_hat ~ L0 + L1 * ||g||_*`` for one parameter or role.

    Attributes:
        l0, l1: the constants, ``>= lower``; ``None`` when there was too little data.
        mse_rel: ``mean(((L_hat - L0 - L1 g) / L_hat)^2)`` over the points with ``L_hat > 0``.
        n_points: the number of finite points used.
        note: why something is missing or special (empty when all is well).
        role: the role of the parameter(s) fitted (``""`` when unknown).
    """

    l0: float | None
    l1: float | None
    mse_rel: float | None
    n_points: int
    note: str = ""
    role: str = ""


Data = Iterable[Mapping[str, Any]] | tuple[Iterable[Any], Iterable[Any]]


def _objective(a: float, b: float, xs: Sequence[float], ys: Sequence[float], lam: float) -> float:
    """``sum r^2 + lam sum max(0, r)^2`` with ``r = y - a - b x``."""
    return math.fsum(
        (1.0 + lam) * r * r if r > 0.0 else r * r
        for r in (y - a - b * x for x, y in zip(xs, ys, strict=True))
    )


def _line_min(c: Sequence[float], q: Sequence[float], lam: float, lo: float) -> float:
    """Exact ``argmin_{s >= lo} phi(s)``, ``phi(s) = sum_i w(r_i) r_i^2``, ``r_i = c_i - s q_i``.

    ``w(r) = 1 + lam`` for ``r > 0``, else 1. ``phi`` is convex and continuously differentiable
    (``max(0, r)^2`` is C^1), and quadratic between the breakpoints ``c_i / q_i``; its slope is
    nondecreasing, so a binary search over the sorted breakpoints finds the piece where it
    crosses zero, and on that piece the minimiser solves a linear equation.
    """

    def weights_at(s: float) -> list[float]:
        return [1.0 + lam if ci - s * qi > 0.0 else 1.0 for ci, qi in zip(c, q, strict=True)]

    def slope(s: float) -> float:  # phi'(s) / 2
        return -math.fsum(
            wi * (ci - s * qi) * qi for wi, ci, qi in zip(weights_at(s), c, q, strict=True)
        )

    if all(qi == 0.0 for qi in q):
        return lo  # phi is constant
    if slope(lo) >= 0.0:
        return lo  # convex and nondecreasing from lo on
    breaks = sorted({ci / qi for ci, qi in zip(c, q, strict=True) if qi != 0.0 and ci / qi > lo})
    j_lo, j_hi = 0, len(breaks)  # the first breakpoint with slope >= 0, or len(breaks)
    while j_lo < j_hi:
        mid = (j_lo + j_hi) // 2
        if slope(breaks[mid]) >= 0.0:
            j_hi = mid
        else:
            j_lo = mid + 1
    left = breaks[j_lo - 1] if j_lo > 0 else lo
    right = breaks[j_lo] if j_lo < len(breaks) else math.inf
    inside = left + 1.0 if right == math.inf else 0.5 * (left + right)
    w = weights_at(inside)
    num = math.fsum(wi * ci * qi for wi, ci, qi in zip(w, c, q, strict=True))
    den = math.fsum(wi * qi * qi for wi, qi in zip(w, q, strict=True))
    if den == 0.0:
        return left
    return min(max(num / den, left), right)


def _newton(
    xs: Sequence[float], ys: Sequence[float], lam: float, max_iter: int = 100
) -> tuple[float, float] | None:
    """The unconstrained minimiser over ``(a, b)``, or ``None`` if it is not unique.

    Newton's method on the piecewise quadratic: on the current sign pattern of the residuals the
    objective is a weighted least-squares problem, whose solution is the Newton point; an exact
    line search along it keeps every step a descent step. The loop stops when the Newton point's
    own residual signs agree with the weights that produced it: then the gradient there is zero
    and, the objective being convex, the point is the global minimiser.
    """
    scale = max(1.0, max(abs(y) for y in ys))
    tol = 1e-12 * scale

    def weighted_ls(w: Sequence[float]) -> tuple[float, float] | None:
        s0 = math.fsum(w)
        s1 = math.fsum(wi * x for wi, x in zip(w, xs, strict=True))
        s2 = math.fsum(wi * x * x for wi, x in zip(w, xs, strict=True))
        t0 = math.fsum(wi * y for wi, y in zip(w, ys, strict=True))
        t1 = math.fsum(wi * x * y for wi, x, y in zip(w, xs, ys, strict=True))
        det = s0 * s2 - s1 * s1
        if not det > 1e-12 * s0 * s2:  # all x (nearly) equal: a + b x is all that is identified
            return None
        return (s2 * t0 - s1 * t1) / det, (s0 * t1 - s1 * t0) / det

    start = weighted_ls([1.0] * len(xs))  # ordinary least squares
    if start is None:
        return None
    a, b = start
    for _ in range(max_iter):
        r = [y - a - b * x for x, y in zip(xs, ys, strict=True)]
        w = [1.0 + lam if ri > 0.0 else 1.0 for ri in r]
        target = weighted_ls(w)
        if target is None:
            return None
        na, nb = target
        consistent = all(
            (y - na - nb * x > 0.0) == (wi > 1.0) or abs(y - na - nb * x) <= tol
            for x, y, wi in zip(xs, ys, w, strict=True)
        )
        if consistent or lam == 0.0:
            return na, nb
        da, db = na - a, nb - b
        s = _line_min(r, [da + db * x for x in xs], lam, 0.0)
        if s == 0.0:  # no descent left: the gradient is zero up to round-off
            return a, b
        a, b = a + s * da, b + s * db
    return a, b


def _solve(
    xs: Sequence[float], ys: Sequence[float], lam: float, lower: float
) -> tuple[float, float, bool]:
    """Exact ``argmin_{a, b >= lower}`` of :func:`_objective`, and whether it is unique in ``a``.

    The objective is convex, so if its unconstrained minimiser is feasible it is the answer;
    otherwise the answer lies on the boundary, the two half-lines ``a = lower`` and
    ``b = lower``, each an exact one-dimensional problem. Comparing all feasible candidates
    (interior first, then ``a = lower``: ties go to ``L0 = lower``) is exact either way.
    """
    candidates: list[tuple[float, float]] = []
    interior = _newton(xs, ys, lam)
    if interior is not None and interior[0] >= lower and interior[1] >= lower:
        candidates.append(interior)
    # a = lower: residual (y - lower) - b x, minimise over b >= lower.
    b_edge = _line_min([y - lower for y in ys], list(xs), lam, lower)
    candidates.append((lower, b_edge))
    # b = lower: residual (y - lower x) - a, minimise over a >= lower.
    a_edge = _line_min(
        [y - lower * x for x, y in zip(xs, ys, strict=True)], [1.0] * len(xs), lam, lower
    )
    candidates.append((a_edge, lower))
    best = min(candidates, key=lambda z: _objective(z[0], z[1], xs, ys, lam))
    return best[0], best[1], interior is not None


def _points(data: Data, euclidean: bool) -> tuple[list[float], list[float], int]:
    """Finite ``(grad_dual, L_hat)`` pairs from records or from two arrays; and how many dropped."""
    y_key, x_key = ("L_hat_euclid", "grad_fro") if euclidean else ("L_hat", "grad_dual")
    pairs: list[tuple[Any, Any]]
    if (
        isinstance(data, tuple)
        and len(data) == 2
        and not isinstance(data[0], Mapping)
        and not isinstance(data[1], Mapping)
    ):
        ys_raw, xs_raw = list(data[0]), list(data[1])
        if len(ys_raw) != len(xs_raw):
            raise ValueError(
                f"fit_l0_l1: L_hat and grad_dual have different lengths "
                f"({len(ys_raw)} and {len(xs_raw)})"
            )
        pairs = list(zip(xs_raw, ys_raw, strict=True))
    else:
        pairs = []
        for rec in data:
            if not isinstance(rec, Mapping):
                raise TypeError(
                    "fit_l0_l1: expected records (mappings) or a pair (L_hat, grad_dual) of "
                    f"sequences, got an item of type {type(rec).__name__}"
                )
            pairs.append((rec.get(x_key), rec.get(y_key)))
    xs: list[float] = []
    ys: list[float] = []
    for x, y in pairs:
        if x is None or y is None:
            continue
        xf, yf = float(x), float(y)
        if math.isfinite(xf) and math.isfinite(yf):
            xs.append(xf)
            ys.append(yf)
    return xs, ys, len(pairs) - len(xs)


def _nonnegative(name: str, v: float) -> float:
    """``v`` as a float, or a ``ValueError`` unless it is a finite number ``>= 0``."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"fit_l0_l1: {name} must be a number, got {v!r}")
    if not (math.isfinite(v) and v >= 0.0):
        raise ValueError(f"fit_l0_l1: {name} must be finite and >= 0, got {v}")
    return float(v)


def fit_l0_l1(
    data: Data,
    penalty: float = 5.0,
    *,
    lower: float = 1e-6,
    euclidean: bool = False,
    role: str = "",
) -> Fit:
    r"""Fit ``L_hat ~ L0 + L1 * ||g||_*`` with the paper's penalty on under-estimation.

    Solves, over ``L0, L1 >= lower``,

    .. math::
        \min \sum_k \bigl(\hat L_k - L_0 - L_1 G_k\bigr)^2
             + \lambda \sum_k \max\bigl(0,\ \hat L_k - L_0 - L_1 G_k\bigr)^2,
        \qquad G_k = \|g^{k+1}\|_*,\ \lambda = \text{penalty}

    (Gluon, Eq. 30 and the official notebooks: ``penalty = 5``, bounds ``(1e-6, None)``). The
    objective is convex and piecewise quadratic in two variables, and it is minimised exactly
    (Newton on the sign pattern with exact line searches, and exact searches along the two
    bounds), where the paper runs L-BFGS-B from ``[1, 1]``. Quality:
    ``MSE_rel = mean(((L_hat - L0 - L1 G) / L_hat)^2)`` over points with ``L_hat > 0``.

    Args:
        data: records from :class:`SmoothnessProbe` (``L_hat`` against ``grad_dual``), or a pair
            ``(L_hat, grad_dual)`` of equal-length sequences (lists, arrays, 1-D tensors).
            ``None`` and non-finite points are dropped.
        penalty: ``lambda >= 0``; 0 is plain least squares (the paper's Euclidean notebook).
        lower: the lower bound of both constants.
        euclidean: fit the Frobenius columns (``L_hat_euclid`` against ``grad_fro``) of records.
        role: stored on the result.

    Returns:
        A :class:`Fit`. Fewer than 3 finite points give ``l0 = l1 = None`` and a note; no input
        data makes this raise or return NaN.
    """
    lam, lo = _nonnegative("penalty", penalty), _nonnegative("lower", lower)
    xs, ys, dropped = _points(data, euclidean)
    notes = [f"dropped {dropped} missing or non-finite point(s)"] if dropped else []
    if len(xs) < 3:
        notes.insert(0, f"too few points to fit ({len(xs)} finite, need 3)")
        return Fit(None, None, None, len(xs), "; ".join(notes), role)
    a, b, identified = _solve(xs, ys, lam, lo)
    if not identified:
        notes.append("all gradient norms equal: only L0 + L1 * ||g||_* is identified")
    rel = [((y - a - b * x) / y) ** 2 for x, y in zip(xs, ys, strict=True) if y > 0.0]
    mse_rel = math.fsum(rel) / len(rel) if rel else None
    if mse_rel is not None and not math.isfinite(mse_rel):
        mse_rel = None
    if mse_rel is None:
        notes.append("no point with L_hat > 0: MSE_rel undefined")
    return Fit(a, b, mse_rel, len(xs), "; ".join(notes), role)


def fit_records(
    records: Iterable[Mapping[str, Any]],
    by: Literal["param", "role"] = "param",
    penalty: float = 5.0,
    *,
    lower: float = 1e-6,
    euclidean: bool = False,
) -> dict[str, Fit]:
    """One :func:`fit_l0_l1` per parameter (``by="param"``) or per role (``by="role"``).

    Keys are the records' ``param`` (or ``role``) in first-seen order; each fit carries the
    role (for ``by="param"``: the role of its records). Fitting by role pools the points of
    every parameter with that role into one fit.
    """
    if by not in ("param", "role"):
        raise ValueError(f"fit_records: by must be 'param' or 'role', got {by!r}")
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    roles: dict[str, str] = {}
    for rec in records:
        key = str(rec.get(by, ""))
        grouped.setdefault(key, []).append(rec)
        roles.setdefault(key, str(rec.get("role", "")))
    return {
        key: fit_l0_l1(recs, penalty, lower=lower, euclidean=euclidean, role=roles[key])
        for key, recs in grouped.items()
    }


def bootstrap_fit(
    data: Data,
    penalty: float = 5.0,
    *,
    samples: int = 200,
    level: float = 0.9,
    seed: int = 0,
    lower: float = 1e-6,
    euclidean: bool = False,
) -> dict[str, Any]:
    """Percentile bootstrap intervals for ``L0`` and ``L1`` of :func:`fit_l0_l1`.

    Resamples the finite points with replacement ``samples`` times (a seeded
    ``random.Random``), refits each resample, and returns
    ``{"l0": (lo, hi), "l1": (lo, hi), "level": level, "samples": n}``, where ``n`` is the
    number of resamples that could be fitted. The intervals show how far the intercept and
    slope trade off. A wide ``L0`` interval that reaches the lower bound means the data cannot
    tell ``L0`` from 0. With fewer than 3 points, both intervals are ``None``.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"bootstrap_fit: samples must be an int >= 1, got {samples!r}")
    if not (isinstance(level, float) and 0.0 < level < 1.0):
        raise ValueError(f"bootstrap_fit: level must be a float in (0, 1), got {level!r}")
    xs, ys, _ = _points(data, euclidean)
    if len(xs) < 3:
        return {"l0": None, "l1": None, "level": level, "samples": 0}
    rng = random.Random(seed)
    l0s: list[float] = []
    l1s: list[float] = []
    n = len(xs)
    for _ in range(samples):
        picks = [rng.randrange(n) for _ in range(n)]
        fit = fit_l0_l1(([ys[i] for i in picks], [xs[i] for i in picks]), penalty, lower=lower)
        if fit.l0 is not None and fit.l1 is not None:
            l0s.append(fit.l0)
            l1s.append(fit.l1)
    if not l0s:
        return {"l0": None, "l1": None, "level": level, "samples": 0}
    tail = (1.0 - level) / 2.0
    return {
        "l0": (_quantile(l0s, tail), _quantile(l0s, 1.0 - tail)),
        "l1": (_quantile(l1s, tail), _quantile(l1s, 1.0 - tail)),
        "level": level,
        "samples": len(l0s),
    }


def _quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values`` by linear interpolation between order statistics."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def radius_dependence(l1_by_radius: Mapping[float, float | None]) -> dict[str, Any]:
    r"""Does a fitted ``L1`` describe the function, or the radius it was probed at?

    Given one layer's ``L1`` fitted at several probing radii ``t`` (or displacements ``s``),
    returns ``{"l1_t": {t: L1 * t}, "slope": b, "flag": ...}``. Here ``b`` is the least-squares
    slope of ``log L1`` against ``log t``. A smoothness constant does not depend on where it
    was measured (``b ~ 0``). An estimate dominated by minibatch noise scales like ``1/t``
    (``b ~ -1``, so ``L1 * t`` is the same number at every ``t``). ``flag`` is ``"1/t"`` when
    ``b < -0.75``, ``"flat"`` when ``|b| < 0.25``, and ``"between"`` otherwise. It is ``None``
    with fewer than 2 usable radii.
    """
    points = [
        (float(t), float(l1))
        for t, l1 in l1_by_radius.items()
        if l1 is not None and t > 0 and l1 > 0 and math.isfinite(t) and math.isfinite(l1)
    ]
    l1_t = {t: l1 * t for t, l1 in points}
    if len({t for t, _ in points}) < 2:
        return {"l1_t": l1_t, "slope": None, "flag": None}
    lx = [math.log(t) for t, _ in points]
    ly = [math.log(l1) for _, l1 in points]
    mx, my = math.fsum(lx) / len(lx), math.fsum(ly) / len(ly)
    slope = math.fsum((x - mx) * (y - my) for x, y in zip(lx, ly, strict=True)) / math.fsum(
        (x - mx) ** 2 for x in lx
    )
    flag = "1/t" if slope < -0.75 else "flat" if abs(slope) < 0.25 else "between"
    return {"l1_t": l1_t, "slope": slope, "flag": flag}
