"""Randomized SVD for LiMuon's low-rank momentum state (pure functions).

LiMuon (Huang, Luo, Chen, arXiv 2509.14562, Algorithms 1-2, option 2) keeps the momentum of a
matrix ``M`` (``m x n``) only as the factors of a rank-``r`` randomized SVD,
``M_hat = U diag(S) V^T`` with ``U`` (``m x r``), ``S`` (``r``) and ``V`` (``n x r``): that is
``(m + n) r + r`` numbers instead of ``m n``. The sketch (Halko, Martinsson, Tropp 2011):

.. code-block:: text

    Omega ~ N(0, 1)^{n x (r + s)}          s = oversampling
    Y = M Omega;   Q, _ = qr(Y)            Q: orthonormal basis of the sampled range
    B = Q^T M;     Ub, S, Vh = svd(B)      a small (r + s) x n SVD
    U = Q Ub;      keep the top r triplets

``Omega`` comes from a ``torch.Generator`` seeded with an integer (:func:`sketch_seed` derives
one from a base seed, the step and the parameter's position), so a sketch is reproducible and a
checkpoint needs no generator state.

The width ``r + s`` and the rank are capped at ``min(m, n)``. With ``r >= min(m, n)`` the
sketch spans the whole range of ``M`` (almost surely), so the factors reproduce ``M`` up to
rounding: full-rank LiMuon is LiMuon option 1.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor

__all__ = ["reconstruct", "rsvd", "sketch_seed"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    # Steele, Lea, Flood, "Fast splittable pseudorandom number generators" (2014): a bijective
    # 64-bit mixer, so distinct inputs give well-separated seeds.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sketch_seed(seed: int, step: int, index: int, salt: str = "") -> int:
    """A 63-bit generator seed from ``(seed, step, index, salt)``, deterministic across runs.

    The optimizer passes the group's ``rsvd_seed``, the parameter's step count, its position in
    its group and the group's role as ``salt``, so that a group sketches the same way whether or
    not it shares the optimizer with other groups.
    """
    h = _splitmix64(seed & _MASK64)
    for value in (step, index, zlib.crc32(salt.encode())):
        h = _splitmix64(h ^ (value & _MASK64))
    return h & ((1 << 63) - 1)


def rsvd(
    a: Tensor, rank: int, *, oversampling: int = 5, seed: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-``rank`` randomized SVD of a matrix: ``a ~= U diag(S) V^T``.

    Args:
        a: a ``(m, n)`` matrix; not modified.
        rank: target rank ``r >= 1``; capped at ``min(m, n)``.
        oversampling: extra sketch columns ``s >= 0`` (LiMuon asks for ``s >= 2``).
        seed: seed of the Gaussian test matrix (a fresh ``torch.Generator`` on ``a``'s device);
            ``None`` draws from torch's global generator.

    Returns:
        ``(U, S, V)`` with shapes ``(m, k)``, ``(k,)``, ``(n, k)``, ``k = min(rank, m, n)``,
        singular values in descending order. Computed in ``a``'s dtype, or float32 for
        half-precision inputs (QR and SVD need it); the caller casts for storage.
    """
    if a.ndim != 2:
        raise ValueError(f"rsvd: need a matrix, got shape {tuple(a.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rsvd: rank must be an int >= 1, got {rank!r}")
    if isinstance(oversampling, bool) or not isinstance(oversampling, int) or oversampling < 0:
        raise ValueError(f"rsvd: oversampling must be an int >= 0, got {oversampling!r}")
    m, n = a.shape
    k = min(rank, m, n)
    width = min(rank + oversampling, m, n)
    dtype = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype
    x = a.to(dtype)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=a.device)
        generator.manual_seed(seed)
    omega = torch.randn(n, width, generator=generator, device=a.device, dtype=dtype)
    q, _ = torch.linalg.qr(x @ omega)  # (m, width), orthonormal columns
    ub, s, vh = torch.linalg.svd(q.mT @ x, full_matrices=False)  # B = Q^T A: (width, n)
    u = q @ ub[:, :k]
    v = vh[:k].mT.contiguous()
    return u, s[:k], v


def reconstruct(u: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """``U diag(S) V^T`` from the factors of :func:`rsvd` (a new ``(m, n)`` tensor)."""
    return (u * s) @ v.mT
