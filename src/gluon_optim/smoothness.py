r"""Layer-wise (L0, L1)-smoothness along the training trajectory: probe, fit, theoretical radii.

Gluon's Assumption 1 (Riabinin et al., arXiv 2505.13416) asks, for every layer ``i`` with its
norm ``||.||_(i)`` and dual norm ``||.||_(i)*``,

.. math::
    \|\nabla_i f(X) - \nabla_i f(Y)\|_{(i)*} \le
        \bigl(L_i^0 + L_i^1 \|\nabla_i f(X)\|_{(i)*}\bigr)\, \|X_i - Y_i\|_{(i)}

(norms, not squared norms). Under it, deterministic Gluon with the radius
``t_i = ||g_i||_* / (L0_i + L1_i ||g_i||_*)`` converges (Theorem 1); with ``L0_i ~ 0`` that radius
is the constant ``1/L1_i``. This module measures the constants on a real run, as the paper's
experiment code does, and turns them into optimizer settings:

* :class:`SmoothnessProbe` attaches to a :class:`~gluon_optim.Gluon` through its step hooks and,
  every ``every`` steps, records for each LMO parameter the trajectory smoothness
  ``L_hat = ||g_{k+1} - g_k||_* / ||X^{k+1} - X^k||`` of two consecutive steps (raw minibatch
  gradients, the layer's own norm pair) and ``||g_{k+1}||_*``. It never changes the numerics.
* :func:`fit_l0_l1` / :func:`fit_records` fit ``L_hat ~ L0 + L1 ||g||_*`` per parameter or per
  role with the paper's penalised least squares, solved exactly.
* :func:`theoretical_radii`, :func:`radius_settings`, :func:`compare_radii`,
  :func:`save_fits` / :func:`load_fits` turn fits into radii, into ``settings`` for
  :func:`gluon_optim.gluon`, into a comparison with a tuned configuration, and into JSON.

The fit and the radius helpers are pure functions of plain floats; only the probe touches
tensors. See ``docs/smoothness.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict, cast

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from gluon_optim import norms as _norms
from gluon_optim.optimizer import Gluon, _to_operand, resolve_norm

__all__ = [
    "Fit",
    "SmoothnessProbe",
    "SmoothnessRecord",
    "compare_radii",
    "fit_l0_l1",
    "fit_records",
    "load_fits",
    "radius_settings",
    "read_records",
    "save_fits",
    "theoretical_radii",
]

# torch.linalg.LinAlgError (a RuntimeError) is what a non-converging SVD raises; typeshed-style
# stubs do not re-export it, hence getattr.
_LinAlgError: type[Exception] = getattr(torch.linalg, "LinAlgError", RuntimeError)

_FITS_FORMAT = "gluon-optim/smoothness-fits"
_FITS_VERSION = 1


class SmoothnessRecord(TypedDict):
    """One measurement of one parameter: the pair of steps ``(k, k + 1)``, ``step = k + 1``.

    Every float is finite or ``None`` (JSON ``null``); ``note`` says why a value is missing.
    ``L_hat_euclid`` and ``grad_fro`` are present when the probe runs with ``euclidean=True``.
    """

    step: int
    param: str
    role: str
    norm: str
    L_hat: float | None
    grad_dual: float | None
    update_norm: float | None
    L_hat_euclid: NotRequired[float | None]
    grad_fro: NotRequired[float | None]
    note: str


# ---------------------------------------------------------------------------------------------
# The probe
# ---------------------------------------------------------------------------------------------


def _param_entries(optimizer: Gluon) -> Iterator[tuple[str, dict[str, Any], Tensor]]:
    """``(key, group, p)`` for every parameter of an LMO group, in ``state_dict`` order.

    The key is the name from the group's ``param_names`` when it has them, else
    ``params[j]`` with ``j`` the parameter's position over all groups (the integer id
    ``state_dict()`` gives it), which is unique where the optimizer's own group-local
    ``params[i]`` is not.
    """
    j = 0
    for group in optimizer.param_groups:
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            key = str(names[i]) if names else f"params[{j}]"
            j += 1
            if group["algorithm"] == "lmo":
                yield key, group, p


@dataclass
class _First:
    """The first point of a pair: ``X^k`` copied before step ``k``, ``g_k`` after it."""

    step: int
    params: dict[int, Tensor]
    grads: dict[int, Tensor | None] | None = None


@dataclass
class _Second:
    """A pair waiting for ``g_{k+1}``: ``dX = X^{k+1} - X^k`` and ``g_k``."""

    step: int
    updates: dict[int, Tensor]
    grads: dict[int, Tensor | None]


def _wide(t: Tensor) -> torch.dtype:
    # Differences of bfloat16/float16 tensors are taken in float32 (a difference of two
    # nearby half-precision numbers is exact there, not in half precision); float64 stays.
    return torch.promote_types(t.dtype, torch.float32)


class SmoothnessProbe:
    r"""Measure layer-wise trajectory smoothness during training, without changing it.

    Every ``every`` optimizer steps the probe measures the pair of consecutive steps
    ``(k, k + 1)`` with ``(k + 1) % every == 0`` (with ``every=50``: steps 49 -> 50, 99 -> 100,
    ..., the cadence of the paper's NanoGPT code), and records for each parameter ``X_i`` of an
    LMO group, with the norm pair of its group (:func:`~gluon_optim.resolve_norm`, applied to the
    operand the optimizer uses: conv kernels as the norm sees them, embeddings transposed):

    .. math::
        \hat L_i = \frac{\|g_i^{k+1} - g_i^k\|_{(i)*}}{\|X_i^{k+1} - X_i^k\|_{(i)}},\qquad
        \text{grad\_dual} = \|g_i^{k+1}\|_{(i)*},\qquad
        \text{update\_norm} = \|X_i^{k+1} - X_i^k\|_{(i)}

    where ``g^k = p.grad`` is the raw minibatch gradient of step ``k`` (a different batch at each
    step, never the momentum), exactly what the optimizer received. With ``euclidean=True`` the
    Frobenius versions ``L_hat_euclid = ||dg||_F / ||dX||_F`` and ``grad_fro = ||g^{k+1}||_F`` are
    recorded too. A batched norm (``bias_rms`` on a matrix) sums its dual norms and takes the
    largest primal norm: the dual pair of the product of per-row balls.

    When the values are taken, through ``register_step_pre_hook`` / ``register_step_post_hook``:
    ``X^k`` before step ``k`` (parameters not yet moved), ``g^k`` after step ``k`` (``.grad``
    holds the gradient that step used, also when ``step(closure)`` computed it inside the step;
    the optimizer never writes ``.grad``), ``X^{k+1}`` before step ``k + 1`` and ``g^{k+1}`` after
    it. Copies exist only from the start of step ``k`` to the end of step ``k + 1``: two per
    LMO parameter (four around a step when ``every=1``), in the parameter's dtype, float32 for
    half-precision differences. Everything runs under ``torch.no_grad()`` on copies, reads no
    random numbers and writes nothing the optimizer reads: parameters, gradients and state are
    bit-identical with and without the probe.

    Never crashes a run, never writes NaN: a zero update (``||dX|| = 0``: a frozen layer, lr 0,
    a skipped step) or a non-finite value gives ``None`` and a ``note``; a parameter without a
    gradient at either step is recorded with ``None`` values and a note; a step that raised
    drops the pair it belonged to; a sink that cannot be written warns once and the records stay
    in :attr:`records`. AdamW groups (``algorithm="adamw"``) have no norm and are skipped.

    Args:
        optimizer: the :class:`~gluon_optim.Gluon` to watch.
        every: measure the pair ``(k, k + 1)`` whenever ``(k + 1) % every == 0``.
        euclidean: also record the Frobenius-norm versions.
        exact_dual: compute the dual of spectral norms (``spectral``, ``spectral_conv``) with
            an exact SVD (the nuclear norm) instead of the group's own polar method. The
            default, like the paper's code, uses ``-<dG, lmo(dG)>`` with the optimizer's LMO
            (Newton–Schulz in bfloat16: cheap, and the dual norm that LMO implies, but it
            under-weights small singular values); the SVD is the clean estimate and costs
            ``O(m n min(m, n))`` per matrix and measurement.
        sink: a JSONL file; every record is appended as one line as soon as it is measured
            (a resumed run continues the same file). Write from one rank only under DDP.
        start_step: the step number of the optimizer's next step (for a probe attached to a
            resumed run, so that ``step`` and the cadence follow the run's count).

    Attributes:
        records: every :class:`SmoothnessRecord` so far, in measurement order.
    """

    def __init__(
        self,
        optimizer: Gluon,
        every: int = 50,
        *,
        euclidean: bool = True,
        exact_dual: bool = False,
        sink: str | Path | None = None,
        start_step: int = 0,
    ) -> None:
        if not isinstance(optimizer, Gluon):
            raise TypeError(
                f"SmoothnessProbe needs a gluon_optim.Gluon optimizer, got "
                f"{type(optimizer).__name__}; the layer norms come from its groups"
            )
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"SmoothnessProbe: every must be an int >= 1, got {every!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"SmoothnessProbe: start_step must be an int >= 0, got {start_step!r}")
        self.optimizer = optimizer
        self.every = every
        self.euclidean = bool(euclidean)
        self.exact_dual = bool(exact_dual)
        self.sink = Path(sink) if sink is not None else None
        self.records: list[SmoothnessRecord] = []
        self._next = start_step  # the number of the next step() call
        self._current = -1  # the step between a pre-hook and its post-hook
        self._first: _First | None = None
        self._second: _Second | None = None
        self._sink_failed = False
        self._handles: list[RemovableHandle] = [
            optimizer.register_step_pre_hook(self._pre_hook),
            optimizer.register_step_post_hook(self._post_hook),
        ]

    # -- lifecycle --------------------------------------------------------------------------------
    def remove(self) -> None:
        """Detach the hooks and free every copy; :attr:`records` stay. Safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._first = None
        self._second = None

    def __enter__(self) -> SmoothnessProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- hooks ------------------------------------------------------------------------------------
    def _pre_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        n = self._next
        self._next += 1
        self._current = n
        # A pair still waiting for its second gradient belongs to a step that raised before its
        # post-hook: drop it.
        self._second = None
        with torch.no_grad():
            first = self._first
            self._first = None
            if first is not None and first.step == n - 1 and first.grads is not None:
                updates: dict[int, Tensor] = {}
                for _, _, p in _param_entries(self.optimizer):
                    x0 = first.params.get(id(p))
                    if x0 is not None:
                        dt = _wide(p)
                        updates[id(p)] = p.detach().to(dt) - x0.to(dt)
                first.params = {}  # X^k is no longer needed once dX exists
                self._second = _Second(first.step, updates, first.grads)
            if (n + 1) % self.every == 0:
                self._first = _First(
                    n,
                    {
                        id(p): p.detach().clone(memory_format=torch.preserve_format)
                        for _, _, p in _param_entries(self.optimizer)
                    },
                )

    def _post_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        n = self._current
        with torch.no_grad():
            entries = list(_param_entries(self.optimizer))
            # .grad now holds g_n, the gradient this step used (the optimizer never writes it).
            # The pair that ends here reads it in place; only the pair that starts here keeps a
            # copy, because the next backward pass will overwrite or free it.
            now: dict[int, Tensor | None] = {id(p): p.grad for _, _, p in entries}
            second, self._second = self._second, None
            if second is not None and second.step == n - 1:
                self._emit([self._measure(second, now, key, g, p) for key, g, p in entries])
            if self._first is not None and self._first.step == n:
                self._first.grads = {
                    i: None if g is None else g.detach().clone(memory_format=torch.preserve_format)
                    for i, g in now.items()
                }

    # -- one measurement --------------------------------------------------------------------------
    def _norm(self, group: Mapping[str, Any], p: Tensor) -> _norms.Norm:
        norm = resolve_norm(group, p)
        if self.exact_dual and isinstance(norm, (_norms.Spectral, _norms.SpectralConv)):
            norm = dataclasses.replace(norm, method="svd")
        return norm

    def _measure(
        self,
        pair: _Second,
        grads: Mapping[int, Tensor | None],
        key: str,
        group: dict[str, Any],
        p: Tensor,
    ) -> SmoothnessRecord:
        k = pair.step
        norm = self._norm(group, p)
        rec: SmoothnessRecord = {
            "step": k + 1,
            "param": key,
            "role": str(group.get("role", "")),
            "norm": norm.name,
            "L_hat": None,
            "grad_dual": None,
            "update_norm": None,
            "note": "",
        }
        if self.euclidean:
            rec["L_hat_euclid"] = None
            rec["grad_fro"] = None
        dx = pair.updates.get(id(p))
        g0 = pair.grads.get(id(p))
        g1 = grads.get(id(p))
        notes: list[str] = []
        if dx is None:
            notes.append(f"not in the optimizer at step {k}")
        if g0 is None:
            notes.append(f"no gradient at step {k}")
        if g1 is None:
            notes.append(f"no gradient at step {k + 1}")
        if dx is None or g0 is None or g1 is None:
            return _finish(rec, notes)

        dt = _wide(g1)
        g1w = g1.to(dt)
        dg = g1w - g0.to(dt)
        # One host synchronisation for the three finiteness checks. Norms are only taken of
        # finite tensors: an SVD of a NaN matrix may raise instead of returning NaN.
        ok_dx, ok_g0, ok_g1 = torch.stack([torch.isfinite(t).all() for t in (dx, g0, g1)]).tolist()
        if not ok_dx:
            notes.append(f"non-finite update X^{k + 1} - X^{k}")
        if not ok_g0:
            notes.append(f"non-finite gradient at step {k}")
        if not ok_g1:
            notes.append(f"non-finite gradient at step {k + 1}")

        transposed = group["transposed"]
        values: dict[str, Tensor] = {}
        try:
            if ok_g1:
                values["grad_dual"] = norm.dual(_to_operand(norm, g1w, transposed)).sum()
                values["grad_fro"] = torch.linalg.vector_norm(g1w)
            if ok_dx:
                values["update_norm"] = norm.norm(_to_operand(norm, dx, transposed)).amax()
                values["update_fro"] = torch.linalg.vector_norm(dx)
            if ok_g0 and ok_g1:
                values["dgrad_dual"] = norm.dual(_to_operand(norm, dg, transposed)).sum()
                values["dgrad_fro"] = torch.linalg.vector_norm(dg)
            got: dict[str, float] = {}
            if values:  # one host synchronisation for every norm of this parameter
                flat = torch.stack([v.double() for v in values.values()]).tolist()
                got = dict(zip(values, flat, strict=True))
        except _LinAlgError as err:  # an SVD that did not converge
            return _finish(rec, [*notes, f"norm computation failed: {err}"])

        rec["grad_dual"] = _finite(got.get("grad_dual"))
        rec["update_norm"] = _finite(got.get("update_norm"))
        rec["L_hat"], why = _ratio(got.get("dgrad_dual"), got.get("update_norm"))
        if why:
            notes.append(why)
        if self.euclidean:
            rec["grad_fro"] = _finite(got.get("grad_fro"))
            rec["L_hat_euclid"], why_fro = _ratio(got.get("dgrad_fro"), got.get("update_fro"))
            if why_fro and why_fro != why:
                notes.append(f"Frobenius: {why_fro}")
        return _finish(rec, notes)

    def _emit(self, records: list[SmoothnessRecord]) -> None:
        self.records.extend(records)
        if self.sink is None or self._sink_failed or not records:
            return
        lines = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records)
        try:
            self.sink.parent.mkdir(parents=True, exist_ok=True)
            with self.sink.open("a", encoding="utf-8") as fh:
                fh.write(lines)
        except OSError as err:
            # A full disk must not end a long training run: keep the records in memory.
            self._sink_failed = True
            warnings.warn(
                f"SmoothnessProbe: cannot write {self.sink} ({err}); records are kept in "
                "probe.records only from now on",
                RuntimeWarning,
                stacklevel=2,
            )


def _finish(rec: SmoothnessRecord, notes: list[str]) -> SmoothnessRecord:
    """``rec`` with its note, keys in the documented order (the note last) for readable JSONL."""
    keys = ["step", "param", "role", "norm", "L_hat", "grad_dual", "update_norm"]
    if "L_hat_euclid" in rec:
        keys += ["L_hat_euclid", "grad_fro"]
    out: dict[str, Any] = {key: rec.get(key) for key in keys}
    out["note"] = "; ".join(notes)
    return cast(SmoothnessRecord, out)


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _ratio(num: float | None, den: float | None) -> tuple[float | None, str]:
    """``num / den`` when it is a finite number, else ``None`` and the reason."""
    if num is None or den is None:
        return None, ""
    if not (math.isfinite(num) and math.isfinite(den)):
        return None, "non-finite norm"
    if den == 0.0:
        return None, "zero update ||X^(k+1) - X^k|| = 0 (frozen layer, lr 0 or a skipped step)"
    r = num / den
    if not math.isfinite(r):
        return None, "ratio overflows (update too small)"
    return r, ""


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a probe's JSONL sink back.

    A malformed last line (a run killed mid-write) is skipped; a malformed line elsewhere is
    an error naming the line.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON record ({err})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{i + 1}: expected a JSON object, got {type(rec).__name__}")
        out.append(rec)
    return out


# ---------------------------------------------------------------------------------------------
# The fit
# ---------------------------------------------------------------------------------------------


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
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)):
        raise ValueError(f"fit_l0_l1: penalty must be a number, got {penalty!r}")
    if not (math.isfinite(penalty) and penalty >= 0.0):
        raise ValueError(f"fit_l0_l1: penalty must be finite and >= 0, got {penalty}")
    if isinstance(lower, bool) or not isinstance(lower, (int, float)):
        raise ValueError(f"fit_l0_l1: lower must be a number, got {lower!r}")
    if not (math.isfinite(lower) and lower >= 0.0):
        raise ValueError(f"fit_l0_l1: lower must be finite and >= 0, got {lower}")
    xs, ys, dropped = _points(data, euclidean)
    notes = [f"dropped {dropped} missing or non-finite point(s)"] if dropped else []
    if len(xs) < 3:
        notes.insert(0, f"too few points to fit ({len(xs)} finite, need 3)")
        return Fit(None, None, None, len(xs), "; ".join(notes), role)
    a, b, identified = _solve(xs, ys, float(penalty), float(lower))
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


# ---------------------------------------------------------------------------------------------
# From fits to radii
# ---------------------------------------------------------------------------------------------


def theoretical_radii(fits: Mapping[str, Fit]) -> dict[str, float]:
    r"""``1 / L1`` for every fit that has an ``L1 > 0``.

    With ``L0 ~ 0`` (the paper's finding) Theorem 1's radius
    ``t = ||g||_* / (L0 + L1 ||g||_*)`` is the constant ``1 / L1``; with a larger ``L0`` it is
    smaller for small gradients and ``1 / L1`` is its limit for large ones.
    """
    return {k: 1.0 / f.l1 for k, f in fits.items() if f.l1 is not None and f.l1 > 0.0}


def radius_settings(
    fits: Mapping[str, Fit],
    by: Literal["role", "param"] = "role",
    *,
    skip_missing: bool = False,
) -> dict[str, dict[str, Any]]:
    """Group settings for the ``l0l1`` radius policy: Gluon's Theorem 1 with fitted constants.

    ``by="role"`` returns ``{role: {"radius": "l0l1", "l0": L0, "l1": L1, "scale": 1.0}}``, ready
    for ``go.gluon(model, lr=1.0, settings=...)``: the optimizer's radius is
    ``t = lr * scale * ||g||_* / (L0 + L1 ||g||_*)``, so ``lr = scale = 1`` is the theorem
    (an LR schedule then multiplies it). When several fits share a role (per-parameter fits)
    the role takes the largest ``L0`` and the largest ``L1``: one radius for the group that the
    assumption allows for every layer in it. Fits made by role map one to one.
    ``by="param"`` keys the same dicts by fit name, for groups of one parameter each.

    Raises ``ValueError`` naming the fits without constants (too little data), unless
    ``skip_missing=True`` drops them; a role left out keeps its preset's constant radius
    ``lr * scale``, which with ``lr = 1`` is almost surely too large. Keep ``L0`` at the fit's
    lower bound rather than 0: ``L0 = 0`` with a zero gradient makes ``0 / 0``.
    """
    if by not in ("role", "param"):
        raise ValueError(f"radius_settings: by must be 'role' or 'param', got {by!r}")
    missing = [k for k, f in fits.items() if f.l0 is None or f.l1 is None]
    if missing and not skip_missing:
        raise ValueError(
            f"radius_settings: fit(s) {missing} have no constants ({fits[missing[0]].note}); "
            "measure more steps or pass skip_missing=True"
        )
    constants: dict[str, tuple[float, float]] = {}
    for key, fit in fits.items():
        if fit.l0 is None or fit.l1 is None:
            continue
        name = key if by == "param" else fit.role or key
        if by == "role" and not name:
            raise ValueError(f"radius_settings: fit {key!r} has no role; use by='param'")
        l0, l1 = constants.get(name, (fit.l0, fit.l1))
        constants[name] = (max(l0, fit.l0), max(l1, fit.l1))
    return {
        name: {"radius": "l0l1", "l0": l0, "l1": l1, "scale": 1.0}
        for name, (l0, l1) in constants.items()
    }


def compare_radii(fits: Mapping[str, Fit], optimizer: Gluon) -> list[dict[str, Any]]:
    """Theoretical radius ``1/L1`` against a configuration's radius, one row per LMO parameter.

    Each row: ``param``, ``role``, ``l0``, ``l1``, ``theory_radius`` (``1/L1``), ``policy`` (the
    group's ``radius``), ``radius`` (``lr * scale`` for a ``constant`` group, else ``None``) and
    ``ratio = radius / theory_radius`` (the paper's tuned/theory: 0.018 / 0.014 ~ 1.3 for the
    NanoGPT blocks). A parameter's fit is looked up by its name (as the probe names it), then
    by its group's role; ``None`` marks what is unknown.
    """
    rows: list[dict[str, Any]] = []
    for key, group, _ in _param_entries(optimizer):
        role = str(group.get("role", ""))
        fit = fits.get(key) or (fits.get(role) if role else None)
        l1 = fit.l1 if fit is not None else None
        theory = 1.0 / l1 if l1 is not None and l1 > 0.0 else None
        lr = group["lr"]
        lr_f = float(lr.item()) if isinstance(lr, Tensor) else float(lr)
        radius = lr_f * float(group["scale"]) if group["radius"] == "constant" else None
        rows.append(
            {
                "param": key,
                "role": role,
                "l0": fit.l0 if fit is not None else None,
                "l1": l1,
                "theory_radius": theory,
                "policy": group["radius"],
                "radius": radius,
                "ratio": radius / theory if radius is not None and theory else None,
            }
        )
    return rows


def save_fits(
    path: str | Path, fits: Mapping[str, Fit], *, meta: Mapping[str, Any] | None = None
) -> None:
    """Write fits as JSON (atomically: a temporary file renamed into place).

    ``meta`` (plain data, e.g. the run and the penalty) is stored alongside. Read back with
    :func:`load_fits`.
    """
    path = Path(path)
    doc = {
        "format": _FITS_FORMAT,
        "version": _FITS_VERSION,
        "meta": dict(meta or {}),
        "fits": {str(k): dataclasses.asdict(f) for k, f in fits.items()},
    }
    text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_fits(path: str | Path) -> dict[str, Fit]:
    """Read fits written by :func:`save_fits`; a malformed file is a ``ValueError`` naming it."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a JSON file ({err})") from None
    if not isinstance(doc, dict) or doc.get("format") != _FITS_FORMAT:
        raise ValueError(f"{path}: not a smoothness fits file (format {_FITS_FORMAT!r})")
    if doc.get("version") != _FITS_VERSION:
        raise ValueError(f"{path}: unsupported version {doc.get('version')!r}")
    raw = doc.get("fits")
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: 'fits' must be an object")
    out: dict[str, Fit] = {}
    for key, entry in raw.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: fit {key!r} must be an object")
        try:
            fit = Fit(
                l0=_opt_float(entry["l0"]),
                l1=_opt_float(entry["l1"]),
                mse_rel=_opt_float(entry["mse_rel"]),
                n_points=int(entry["n_points"]),
                note=str(entry.get("note", "")),
                role=str(entry.get("role", "")),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: fit {key!r} is malformed ({err!r})") from None
        out[str(key)] = fit
    return out


def _opt_float(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"expected a finite number or null, got {v!r}")
    return float(v)
