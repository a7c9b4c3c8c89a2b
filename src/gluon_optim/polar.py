"""The polar factor ``U V^T`` of a matrix: Newton–Schulz iterations and an exact SVD.

For ``G = U S V^T`` (reduced SVD), ``polar(G) = U V^T`` is the minimiser of ``<G, A>`` over the
unit ball of the spectral norm, up to sign; every spectral LMO in :mod:`gluon_optim.norms` is a
scaled copy of it. Two ways to compute it:

* :func:`newton_schulz`: odd matrix polynomials ``X <- a X + b (X X^T) X + c (X X^T)^2 X``
  applied to ``G / ||G||_F``, in a low-precision compute dtype (bfloat16 by default). Cheap,
  approximate, matrix products only. ``form="gram"`` runs the same polynomials on the small
  Gram matrix ``X X^T`` (:func:`gram_newton_schulz`), which needs fewer multiply-adds for
  rectangular matrices; ``form="auto"`` picks the cheaper form per shape by a FLOP count.
* :func:`polar_svd`: the exact factor from ``torch.linalg.svd``, the test oracle.

:func:`polar_express_schedule` recomputes the Polar Express coefficients (Amsel et al. 2025,
Algorithm 1) from first principles; the tests check it against the published numbers.

Both are pure: they never write into their input, and a zero matrix maps to a zero matrix (the
polynomials fix 0; the SVD path keeps only singular directions with a non-negligible singular
value), so a zero gradient gives a zero step rather than NaN.

All functions take ``(..., m, n)`` tensors and act on the last two dimensions, batched over the
leading ones.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "GRAM_MIN_DIM",
    "GRAM_RESTARTS",
    "NS_FORMS",
    "NS_PRESETS",
    "COMPILE_BACKENDS",
    "NewtonSchulzPreset",
    "PolarMethod",
    "compiled_newton_schulz",
    "gram_newton_schulz",
    "newton_schulz",
    "ns_cost",
    "polar_express_schedule",
    "polar",
    "polar_svd",
    "relative_error",
]

PolarMethod = Literal["newton_schulz", "svd"]
NsForm = Literal["standard", "gram", "auto"]
Coefficients = tuple[float, float, float]

#: Ways to evaluate the Newton–Schulz polynomials (see :func:`newton_schulz`).
NS_FORMS: tuple[str, ...] = ("standard", "gram", "auto")

#: Iterations before which :func:`gram_newton_schulz` rebuilds ``X`` and its Gram matrix from
#: scratch. Dao et al. (2026) restart once, after the second iteration, for half precision; we
#: measured the same (docs/performance.md): without a restart, bfloat16 round-off in ``X X^T``
#: is amplified by the early, steep polynomials (``a`` near 8) until it swamps the small singular
#: values, and ill-conditioned inputs blow up (relative error 1e7 on a ``sigma_i ~ i^-1.5``
#: spectrum); restarting after iteration 1 is not enough (error 1.0 there), after iteration 2 is.
GRAM_RESTARTS: tuple[int, ...] = (2,)


@dataclass(frozen=True)
class NewtonSchulzPreset:
    """A named schedule of quintic Newton–Schulz coefficients.

    Step ``j`` applies ``p_j(x) = a_j x + b_j x^3 + c_j x^5`` to every singular value. Steps past
    the end of ``coefficients`` repeat its last entry. ``safety`` divides the initial Frobenius
    normalisation further (``X_0 = G / (safety * ||G||_F)``) so that bfloat16 rounding cannot push
    the largest singular value past the interval the polynomials were designed for.
    """

    name: str
    coefficients: tuple[Coefficients, ...]
    safety: float = 1.0
    reference: str = ""

    def schedule(self, steps: int) -> list[Coefficients]:
        """The coefficients of ``steps`` iterations."""
        coeffs = list(self.coefficients[:steps])
        coeffs += [self.coefficients[-1]] * (steps - len(coeffs))
        return coeffs


def _polar_express_coefficients() -> tuple[Coefficients, ...]:
    # Amsel, Persson, Musco, Gower, "The Polar Express" (arXiv 2505.16932), Algorithm 1: the
    # minimax-optimal degree-5 compositions for sigma in [1e-3, 1]. As in that algorithm, every
    # polynomial but the last is rescaled by a 1.01 safety factor (a/1.01, b/1.01^3, c/1.01^5) so
    # that bfloat16 round-off cannot make the iteration diverge.
    raw = (
        (8.28721201814563, -23.595886519098837, 17.300387312530933),
        (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
        (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
        (3.3184196573706015, -2.488488024314874, 0.51004894012372),
        (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
        (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
        (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
        (1.875, -1.25, 0.375),
    )
    safe = tuple((a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in raw[:-1])
    return safe + (raw[-1],)


def _solve4(a: list[list[float]], b: list[float]) -> list[float]:
    """Solve a small dense linear system by Gaussian elimination with partial pivoting."""
    n = len(b)
    m = [row[:] + [rhs] for row, rhs in zip(a, b, strict=True)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        if m[piv][col] == 0.0:
            raise ZeroDivisionError("singular system")
        m[col], m[piv] = m[piv], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= f * m[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x


def _optimal_odd_quintic(lo: float, hi: float) -> Coefficients:
    """The odd quintic ``p`` minimising ``max |1 - p(x)|`` over ``[lo, hi]`` (Remez exchange).

    By equioscillation the optimum touches ``1 -/+ E`` alternately at ``lo``, at the two
    interior extrema of ``p`` (roots of ``p'(x) = a + 3b x^2 + 5c x^4``, a quadratic in
    ``x^2``) and at ``hi``; the exchange iterates those four points to a fixed point.
    """
    xs = [lo + (hi - lo) * t for t in (0.0, 1 / 3, 2 / 3, 1.0)]
    a = b = c = 0.0
    for _ in range(100):
        rows = [[x, x**3, x**5, (-1.0) ** i] for i, x in enumerate(xs)]
        a, b, c, _err = _solve4(rows, [1.0] * 4)
        disc = 9 * b * b - 20 * a * c
        if c == 0.0 or disc < 0.0:
            break
        roots = sorted(((-3 * b + sign * math.sqrt(disc)) / (10 * c)) for sign in (-1.0, 1.0))
        inner = [math.sqrt(r) for r in roots if r > 0.0 and lo < math.sqrt(r) < hi]
        if len(inner) != 2:
            break
        new = [lo, inner[0], inner[1], hi]
        if max(abs(u - v) for u, v in zip(new, xs, strict=True)) < 1e-15:
            break
        xs = new
    return a, b, c


#: Polar Express's cushion for degree 5: each polynomial is fitted on
#: ``[max(lo, cushion * hi), hi]`` so that none is too steep near 0 for bfloat16.
POLAR_EXPRESS_CUSHION = 0.02407327424182761


def polar_express_schedule(
    steps: int, lower: float = 1e-3, *, cushion: float = POLAR_EXPRESS_CUSHION
) -> tuple[Coefficients, ...]:
    """The greedy minimax quintic schedule of Polar Express (Amsel et al. 2025, Algorithm 1).

    Starting from singular values in ``[lower, 1]``, step ``t`` takes the odd quintic that best
    maps ``[max(l_t, cushion * u_t), u_t]`` to 1 in the max norm, rescales it so that
    ``1 - p(l_t) = p(u_t) - 1`` (re-centring after the cushion), and moves to
    ``[l_{t+1}, u_{t+1}] = [p(l_t), 2 - p(l_t)]``. Once the interval has collapsed to 1 the
    step is the classical quintic ``(15/8, -10/8, 3/8)``. No safety factor is applied here; the
    ``polar_express`` preset divides by 1.01 as the paper does.

    With ``lower=1e-3`` this reproduces the paper's published coefficients (to 1e-12; tested).
    A larger ``lower`` gives schedules that converge in fewer steps for well-conditioned inputs
    and worse ones for ill-conditioned inputs (docs/performance.md measures 4-step ones).
    """
    if steps < 1:
        raise ValueError(f"polar_express_schedule: steps must be >= 1, got {steps}")
    if not 0.0 < lower < 1.0:
        raise ValueError(f"polar_express_schedule: lower must be in (0, 1), got {lower}")
    lo, hi = lower, 1.0
    out: list[Coefficients] = []
    for _ in range(steps):
        fit_lo = max(lo, cushion * hi)
        if hi - fit_lo < 1e-6:  # collapsed: the limit polynomial (the fit is ill-posed)
            a, b, c = 15 / 8, -10 / 8, 3 / 8
        else:
            a, b, c = _optimal_odd_quintic(fit_lo, hi)
        s = 2.0 / (_quintic(a, b, c, lo) + _quintic(a, b, c, hi))
        a, b, c = a * s, b * s, c * s
        out.append((a, b, c))
        lo = _quintic(a, b, c, lo)
        hi = 2.0 - lo
    return tuple(out)


def _quintic(a: float, b: float, c: float, x: float) -> float:
    return a * x + b * x**3 + c * x**5


NS_PRESETS: dict[str, NewtonSchulzPreset] = {
    # Keller Jordan's quintic, used unchanged by torch.optim.Muon and the Scion code: chosen for a
    # steep slope at zero; it does not converge to U V^T but leaves singular values in roughly
    # [0.7, 1.2] after 5 steps, which is what Muon was tuned with.
    "jordan": NewtonSchulzPreset(
        name="jordan",
        coefficients=((3.4445, -4.7750, 2.0315),),
        reference="Jordan et al. 2024, Muon; torch.optim.Muon defaults",
    ),
    "polar_express": NewtonSchulzPreset(
        name="polar_express",
        coefficients=_polar_express_coefficients(),
        safety=1.01,
        reference="Amsel et al. 2025, The Polar Express, arXiv 2505.16932, Algorithm 1",
    ),
    # The classical cubic Newton–Schulz iteration p(x) = (3x - x^3)/2: converges to U V^T but
    # slowly from small singular values. Kept as a baseline for accuracy studies.
    "cubic": NewtonSchulzPreset(
        name="cubic",
        coefficients=((1.5, -0.5, 0.0),),
        reference="Higham, Functions of Matrices, ch. 8",
    ),
}


def ns_cost(
    m: int, n: int, steps: int, form: str, restarts: tuple[int, ...] = GRAM_RESTARTS
) -> int:
    """Multiply-adds of ``steps`` quintic iterations on an ``m x n`` matrix, in units of ``k^3``.

    ``k = min(m, n)`` and ``r = max(m, n) / k`` (rounded up). The standard form costs
    ``2r + 1`` per step (``A = X X^T``, ``A^2``, ``(bA + cA^2) X``). The Gram form costs ``r``
    for ``R = X X^T``, per step 1 for ``R^2``, 1 for ``Q <- P Q`` (free on the first step after a
    (re)start, where ``Q = P``) and 2 for ``R <- P R P`` (skipped before a restart and on the last
    step), ``2r`` per restart (``X <- Q X`` and a fresh ``X X^T``) and ``r`` for the final
    ``Q X``. Used by ``form="auto"`` and by the benchmark's FLOP column.
    """
    k = min(m, n)
    r = -(-max(m, n) // k)
    if form == "standard":
        return steps * (2 * r + 1)
    if form != "gram":
        raise ValueError(f"ns_cost: form must be 'standard' or 'gram', got {form!r}")
    cost = 2 * r  # the first X X^T and the final Q X
    fresh = True
    for j in range(steps):
        if j in restarts and j > 0:
            cost += 2 * r
            fresh = True
        cost += 1  # R^2
        if not fresh:
            cost += 1  # Q <- P Q
        fresh = False
        if j + 1 < steps and (j + 1) not in restarts:
            cost += 2  # R <- P R P
    return cost


#: ``form="auto"`` keeps matrices whose short side is below this standard: there the extra
#: small products cost more in per-call overhead than the multiply-adds they save (on the
#: 2-core CPU of docs/performance.md the Gram form is 6-14% slower at k = 32-64 and 4-37%
#: faster from k = 128 on, aspect ratios 3-4).
GRAM_MIN_DIM = 128


def _choose_form(form: str, m: int, n: int, steps: int) -> str:
    if form == "auto":
        if min(m, n) < GRAM_MIN_DIM:
            return "standard"
        gram = ns_cost(m, n, steps, "gram")
        return "gram" if gram < ns_cost(m, n, steps, "standard") else "standard"
    if form not in ("standard", "gram"):
        raise ValueError(f"newton_schulz: form must be one of {NS_FORMS}, got {form!r}")
    return form


def _addmm(bias: Tensor, a: Tensor, b: Tensor, beta: float, alpha: float = 1.0) -> Tensor:
    # beta * bias + alpha * a @ b in one call, for single matrices and for stacks.
    if a.ndim == 2:
        return torch.addmm(bias, a, b, beta=beta, alpha=alpha)
    return torch.baddbmm(bias, a, b, beta=beta, alpha=alpha)


def newton_schulz(
    g: Tensor,
    *,
    preset: str | NewtonSchulzPreset = "jordan",
    steps: int = 5,
    dtype: torch.dtype | None = torch.bfloat16,
    eps: float = 1e-7,
    form: NsForm | str = "standard",
) -> Tensor:
    """Approximate ``polar(g) = U V^T`` with quintic Newton–Schulz iterations.

    .. math::
        X_0 = G / \\max(s\\,\\|G\\|_F, \\varepsilon), \\qquad
        X_{j+1} = a_j X_j + (b_j A_j + c_j A_j^2) X_j, \\quad A_j = X_j X_j^T

    computed on the wide orientation (``m <= n``, transposing tall inputs) so that the Gram
    matrix ``A_j`` is the smaller one. For a single 2-D input with the ``jordan`` preset in
    bfloat16 and ``form="standard"`` the operations are those of ``torch.optim.Muon`` in the
    same order, so results agree bit for bit.

    Args:
        g: input of shape ``(..., m, n)``; not modified.
        preset: a key of :data:`NS_PRESETS` or a :class:`NewtonSchulzPreset`.
        steps: number of iterations (>= 1).
        dtype: compute dtype (``None``: the input's dtype). The result has this dtype.
        eps: floor on the normalising Frobenius norm; a zero input returns zeros.
        form: ``"standard"`` (the recurrence above), ``"gram"`` (:func:`gram_newton_schulz`:
            the same polynomials on ``X X^T``) or ``"auto"`` (whichever :func:`ns_cost` says
            is cheaper for this shape: Gram for aspect ratios of 2 and more at 5 steps, once
            the short side reaches :data:`GRAM_MIN_DIM`).

    Returns:
        The approximate polar factor, same shape as ``g``, in ``dtype``.
    """
    spec = _checked_preset("newton_schulz", g, steps, preset)
    chunk = _cpu_chunk(g, dtype)
    if chunk is not None:
        flat = g.reshape(-1, *g.shape[-2:])
        parts = [
            newton_schulz(c, preset=spec, steps=steps, dtype=dtype, eps=eps, form=form)
            for c in torch.split(flat, chunk)
        ]
        return torch.cat(parts).reshape(g.shape)
    chosen = _choose_form(form, g.size(-2), g.size(-1), steps)
    x, undo = _normalised_wide(g, spec, dtype, eps)
    if chosen == "gram":
        x = _gram_iterations(x, spec.schedule(steps), GRAM_RESTARTS)
    else:
        for a, b, c in spec.schedule(steps):
            gram = x @ x.mT
            update = _addmm(gram, gram, gram, beta=b, alpha=c)
            x = _addmm(x, update, x, beta=a)
    return undo(x)


#: On a CPU, a batch of matrices goes through Newton–Schulz in chunks of about this many bytes
#: (in the compute dtype). Measured on a 2-core AMD EPYC, torch 2.13, bf16, 64 matrices, ms per
#: matrix, one call per matrix / one batch of all 64 / chunks of 1 MiB: (128, 256) 0.61 / 0.21 /
#: 0.20; (256, 512) 1.79 / 2.01 / 1.47; (512, 512) 5.88 / 14.9 / 6.43. A whole batch of large
#: matrices leaves the caches (each iteration streams it several times), while small ones gain
#: most from batching. A GPU batches everything.
CPU_BATCH_BYTES = 1 << 20


def _cpu_chunk(g: Tensor, dtype: torch.dtype | None) -> int | None:
    """How many matrices of ``g`` go through one batched call, or ``None`` for all at once."""
    if g.ndim < 3 or g.device.type != "cpu":
        return None
    itemsize = torch.empty((), dtype=dtype or g.dtype).element_size()
    chunk = max(1, CPU_BATCH_BYTES // (g.size(-2) * g.size(-1) * itemsize))
    return chunk if g.shape[:-2].numel() > chunk else None


def gram_newton_schulz(
    g: Tensor,
    *,
    preset: str | NewtonSchulzPreset = "polar_express",
    steps: int = 5,
    dtype: torch.dtype | None = torch.bfloat16,
    eps: float = 1e-7,
    restarts: tuple[int, ...] = GRAM_RESTARTS,
) -> Tensor:
    """Newton–Schulz in Gram form: the same iterates as :func:`newton_schulz`, fewer FLOPs.

    Every iterate is ``X_j = Q_j X_0`` with ``Q_j`` a polynomial in ``R_0 = X_0 X_0^T``, so
    with ``P_j = a_j I + b_j R_j + c_j R_j^2`` the recurrence runs on ``k x k`` matrices
    (``k = min(m, n)``) and touches the long side only at the ends:

    .. math::
        Q_{j+1} = P_j Q_j, \\qquad R_{j+1} = X_{j+1} X_{j+1}^T = P_j R_j P_j, \\qquad
        X_J = Q_J X_0 .

    In exact arithmetic the result equals the standard form's. In bfloat16 the Gram matrix's
    round-off is amplified by the steep first polynomials, so the iteration restarts
    (``X <- Q X``, ``R <- X X^T``, ``Q <- I``) before each index in ``restarts``
    (Dao et al., "Gram Newton-Schulz", 2026; see :data:`GRAM_RESTARTS`). For an ``m x rm``
    matrix and 5 steps this is ``4r + 14`` multiply-adds per ``k^3`` against ``10r + 5``
    (:func:`ns_cost`): fewer from aspect ratio 2 on; for square matrices it is more and less
    stable, which is why ``newton_schulz(form="auto")`` keeps those standard.

    Args as :func:`newton_schulz`, plus ``restarts`` (iteration indices; ``()`` for none).
    """
    spec = _checked_preset("gram_newton_schulz", g, steps, preset)
    x, undo = _normalised_wide(g, spec, dtype, eps)
    return undo(_gram_iterations(x, spec.schedule(steps), tuple(restarts)))


def _checked_preset(
    caller: str, g: Tensor, steps: int, preset: str | NewtonSchulzPreset
) -> NewtonSchulzPreset:
    """Validate a Newton–Schulz call's input and step count; return the preset it names."""
    if g.ndim < 2:
        raise ValueError(f"{caller}: input must have at least 2 dimensions, got {g.ndim}")
    if steps < 1:
        raise ValueError(f"{caller}: steps must be >= 1, got {steps}")
    return NS_PRESETS[preset] if isinstance(preset, str) else preset


def _gram_iterations(x: Tensor, schedule: list[Coefficients], restarts: tuple[int, ...]) -> Tensor:
    # x: normalised, wide (..., k, n) with k <= n. See gram_newton_schulz for the algebra.
    r = x @ x.mT
    q: Tensor | None = None  # None stands for the identity: Q = P needs no product
    last = len(schedule) - 1
    for j, (a, b, c) in enumerate(schedule):
        if j in restarts and j > 0 and q is not None:
            x = q @ x
            r = x @ x.mT
            q = None
        p = _addmm(r, r, r, beta=b, alpha=c)
        p.diagonal(dim1=-2, dim2=-1).add_(a)
        q = p if q is None else p @ q
        if j < last and (j + 1) not in restarts:
            r = p @ r @ p
    assert q is not None  # the schedule has at least one step
    return q @ x


def _normalised_wide(
    g: Tensor, spec: NewtonSchulzPreset, dtype: torch.dtype | None, eps: float
) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``G / (s ||G||_F)`` cast to ``dtype``, in the wide orientation, batch dims flattened.

    Returns it with the function that undoes the orientation and the flattening.
    """
    # A compute dtype of narrower range than the input (float16: max 65504) would turn large
    # entries into inf if cast first, so such inputs are normalised in their own dtype and cast
    # after. bfloat16 has float32's range and is cast first, as torch.optim.Muon does.
    narrow = (
        dtype is not None
        and g.is_floating_point()
        and torch.finfo(dtype).max < 0.5 * torch.finfo(g.dtype).max
    )
    x = g.to(dtype) if dtype is not None and not narrow else g
    transposed = g.size(-2) > g.size(-1)
    if transposed:
        x = x.mT
    batch_shape = x.shape[:-2]
    if x.ndim > 3:
        x = x.reshape(-1, *x.shape[-2:])
    norm = x.norm() if x.ndim == 2 else x.norm(dim=(-2, -1), keepdim=True)
    if spec.safety != 1.0:
        norm = norm * spec.safety
    # Out of place on purpose: `g.to(dtype)` returns `g` itself when the dtypes already match, and
    # an in-place division would then rescale the caller's tensor (the aliasing bug fixed in
    # pytorch/pytorch#190597).
    x = x / norm.clamp(min=eps)
    if narrow:
        x = x.to(dtype)

    def undo(y: Tensor) -> Tensor:
        if len(batch_shape) > 1:
            y = y.reshape(*batch_shape, *y.shape[-2:])
        return y.mT if transposed else y

    return x, undo


#: ``torch.compile`` backends accepted by :func:`compiled_newton_schulz` (and the ``compile``
#: group key): ``inductor`` generates fused kernels (a C++ compiler on CPU, Triton on GPU);
#: ``aot_eager`` and ``eager`` only trace, for debugging and for the tests.
COMPILE_BACKENDS: tuple[str, ...] = ("inductor", "aot_eager", "eager")


@cache
def compiled_newton_schulz(backend: str = "inductor") -> Callable[..., Tensor]:
    """:func:`newton_schulz` under ``torch.compile(fullgraph=True, dynamic=False)``.

    One compiled function per backend, shared by every caller; it specialises (and recompiles)
    per input shape, dtype and Newton–Schulz setting, all of which are fixed during training.
    Learning rates and other hyperparameters never enter it, so changing them (a scheduler)
    never recompiles; the tests check that with dynamo's frame counters.
    """
    if backend not in COMPILE_BACKENDS:
        raise ValueError(
            f"compiled_newton_schulz: unknown backend {backend!r}; expected one of "
            f"{list(COMPILE_BACKENDS)}"
        )
    compiled: Callable[..., Tensor] = torch.compile(
        newton_schulz, backend=backend, fullgraph=True, dynamic=False
    )

    @functools.wraps(newton_schulz)
    def run(*args: Any, **kwargs: Any) -> Tensor:
        # One specialisation per (shape, dtype, setting) in the model. Dynamo's default limit of
        # 8 per function would make a model with more distinct matrix shapes than that (any
        # ResNet) fail with FailOnRecompileLimitHit, so the limit is raised for this call only.
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return compiled(*args, **kwargs)

    return run


#: The most specialisations :func:`compiled_newton_schulz` keeps per backend (distinct
#: shape / dtype / Newton–Schulz settings); past it, dynamo fails loudly, never silently.
RECOMPILE_LIMIT = 256


def polar_svd(g: Tensor, *, dtype: torch.dtype | None = None, rtol: float | None = None) -> Tensor:
    """The exact polar factor ``U V^T`` from a reduced SVD (the oracle for Newton–Schulz).

    Singular directions whose singular value is below ``rtol * sigma_max`` are dropped, which
    makes the result the unique polar factor of the best low-rank part: a zero matrix gives a
    zero matrix, and a rank-deficient one gives a partial isometry, as Newton–Schulz does in the
    limit (its polynomials fix 0).

    Args:
        g: input of shape ``(..., m, n)``; not modified.
        dtype: compute and result dtype (``None``: float32 for half-precision inputs, else the
            input's dtype).
        rtol: relative rank tolerance; default ``max(m, n) * finfo(dtype).eps``.
    """
    if g.ndim < 2:
        raise ValueError(f"polar_svd: input must have at least 2 dimensions, got {g.ndim}")
    if dtype is None:
        dtype = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else g.dtype
    x = g.to(dtype)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    if rtol is None:
        rtol = max(g.size(-2), g.size(-1)) * torch.finfo(dtype).eps
    keep = s > rtol * s.amax(dim=-1, keepdim=True)
    # An all-zero input has s.amax == 0, so `keep` is all False and the result is zero.
    out: Tensor = (u * keep.unsqueeze(-2).to(dtype)) @ vh
    return out


def polar(
    g: Tensor,
    *,
    method: PolarMethod = "newton_schulz",
    preset: str | NewtonSchulzPreset = "jordan",
    steps: int = 5,
    dtype: torch.dtype | None = torch.bfloat16,
    form: NsForm | str = "standard",
    compile: str = "",
) -> Tensor:
    """Dispatch to :func:`newton_schulz` or :func:`polar_svd` by ``method``.

    ``compile`` names a :data:`COMPILE_BACKENDS` entry to run Newton–Schulz through
    :func:`compiled_newton_schulz` (``""``: eagerly). For ``method="svd"`` the ``dtype`` is
    raised to at least float32 (an SVD in bfloat16 does not exist), and
    ``preset``/``steps``/``form``/``compile`` are ignored.
    """
    if method == "newton_schulz":
        ns = compiled_newton_schulz(compile) if compile else newton_schulz
        return ns(g, preset=preset, steps=steps, dtype=dtype, form=form)
    if method == "svd":
        svd_dtype = None if dtype in (None, torch.bfloat16, torch.float16) else dtype
        return polar_svd(g, dtype=svd_dtype)
    raise ValueError(f"polar: unknown method {method!r}; expected 'newton_schulz' or 'svd'")


def relative_error(x: Tensor, reference: Tensor) -> float:
    """Relative Frobenius distance ``||x - ref||_F / ||ref||_F``, computed in float64."""
    ref = reference.to(torch.float64)
    return float((x.to(torch.float64) - ref).norm() / ref.norm().clamp(min=1e-300))
