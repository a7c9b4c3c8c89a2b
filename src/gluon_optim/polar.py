"""The polar factor ``U V^T`` of a matrix: Newton–Schulz iterations and an exact SVD.

For ``G = U S V^T`` (reduced SVD), ``polar(G) = U V^T`` is the minimiser of ``<G, A>`` over the
unit ball of the spectral norm, up to sign; every spectral LMO in :mod:`gluon_optim.norms` is a
scaled copy of it. Two ways to compute it:

* :func:`newton_schulz`: odd matrix polynomials ``X <- a X + b (X X^T) X + c (X X^T)^2 X``
  applied to ``G / ||G||_F``, in a low-precision compute dtype (bfloat16 by default). Cheap,
  approximate, matrix products only.
* :func:`polar_svd`: the exact factor from ``torch.linalg.svd``, the test oracle.

Both are pure: they never write into their input, and a zero matrix maps to a zero matrix (the
polynomials fix 0; the SVD path keeps only singular directions with a non-negligible singular
value), so a zero gradient gives a zero step rather than NaN.

All functions take ``(..., m, n)`` tensors and act on the last two dimensions, batched over the
leading ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "NS_PRESETS",
    "NewtonSchulzPreset",
    "PolarMethod",
    "newton_schulz",
    "polar",
    "polar_svd",
    "relative_error",
]

PolarMethod = Literal["newton_schulz", "svd"]
Coefficients = tuple[float, float, float]


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


def newton_schulz(
    g: Tensor,
    *,
    preset: str | NewtonSchulzPreset = "jordan",
    steps: int = 5,
    dtype: torch.dtype | None = torch.bfloat16,
    eps: float = 1e-7,
) -> Tensor:
    """Approximate ``polar(g) = U V^T`` with quintic Newton–Schulz iterations.

    .. math::
        X_0 = G / \\max(s\\,\\|G\\|_F, \\varepsilon), \\qquad
        X_{j+1} = a_j X_j + (b_j A_j + c_j A_j^2) X_j, \\quad A_j = X_j X_j^T

    computed on the wide orientation (``m <= n``, transposing tall inputs) so that the Gram
    matrix ``A_j`` is the smaller one. For a single 2-D input with the ``jordan`` preset in
    bfloat16 the operations are those of ``torch.optim.Muon`` in the same order, so results agree
    bit for bit.

    Args:
        g: input of shape ``(..., m, n)``; not modified.
        preset: a key of :data:`NS_PRESETS` or a :class:`NewtonSchulzPreset`.
        steps: number of iterations (>= 1).
        dtype: compute dtype (``None``: the input's dtype). The result has this dtype.
        eps: floor on the normalising Frobenius norm; a zero input returns zeros.

    Returns:
        The approximate polar factor, same shape as ``g``, in ``dtype``.
    """
    if g.ndim < 2:
        raise ValueError(f"newton_schulz: input must have at least 2 dimensions, got {g.ndim}")
    if steps < 1:
        raise ValueError(f"newton_schulz: steps must be >= 1, got {steps}")
    spec = NS_PRESETS[preset] if isinstance(preset, str) else preset
    x = g.to(dtype) if dtype is not None else g
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
    for a, b, c in spec.schedule(steps):
        if x.ndim == 2:
            gram = x @ x.T
            update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.addmm(x, update, x, beta=a)
        else:
            gram = x @ x.mT
            update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.baddbmm(x, update, x, beta=a)
    if len(batch_shape) > 1:
        x = x.reshape(*batch_shape, *x.shape[-2:])
    if transposed:
        x = x.mT
    return x


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
) -> Tensor:
    """Dispatch to :func:`newton_schulz` or :func:`polar_svd` by ``method``.

    For ``method="svd"`` the ``dtype`` is raised to at least float32 (an SVD in bfloat16 does not
    exist), and ``preset``/``steps`` are ignored.
    """
    if method == "newton_schulz":
        return newton_schulz(g, preset=preset, steps=steps, dtype=dtype)
    if method == "svd":
        svd_dtype = None if dtype in (None, torch.bfloat16, torch.float16) else dtype
        return polar_svd(g, dtype=svd_dtype)
    raise ValueError(f"polar: unknown method {method!r}; expected 'newton_schulz' or 'svd'")


def relative_error(x: Tensor, reference: Tensor) -> float:
    """Relative Frobenius distance ``||x - ref||_F / ||ref||_F``, computed in float64."""
    ref = reference.to(torch.float64)
    return float((x.to(torch.float64) - ref).norm() / ref.norm().clamp(min=1e-300))
