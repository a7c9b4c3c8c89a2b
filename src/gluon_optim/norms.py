"""Layer norms, their linear minimisation oracles (LMOs) and dual norms.

Every norm here provides three pure, out-of-place functions:

* ``lmo(g)``: the minimiser of ``<g, a>`` over the unit ball ``{a : ||a|| <= 1}``. It carries the
  minus sign, so ``<g, lmo(g)> = -||g||_*`` (the convention of Gluon and Scion).
* ``dual(g)``: the dual norm ``||g||_* = max_{||a|| <= 1} <g, a>``.
* ``norm(x)``: the primal norm itself.

A matrix ``A`` of shape ``(d_out, d_in)`` is read as stored by ``nn.Linear.weight``. Matrix norms
act on the last two dimensions and are batched over leading ones; ``bias_rms`` acts on the last
dimension; ``euclidean`` and ``sign_unscaled`` treat the whole tensor as one vector;
``spectral_conv`` takes one kernel ``(C_out, C_in, *kernel)``.

Scaling rule used throughout: if ``||.|| = c ||.||_base`` then ``lmo = lmo_base / c`` and
``||.||_* = ||.||_{base,*} / c``. Each norm is therefore written as a *direction* ``D`` and a
scalar *factor* ``f`` with ``lmo(g) = -f * D(g)``; the optimizer folds ``f`` into the step size so
that the direction (for example a bfloat16 Newton–Schulz output) is never rescaled in low
precision.

References: Pethick et al. 2025 (Scion, arXiv 2502.07529) Tables 2-3 and App. A;
Riabinin et al. 2025 (Gluon, arXiv 2505.13416) section 4.1.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import ClassVar, Literal

import torch
from torch import Tensor

from gluon_optim import blocks as _blocks
from gluon_optim.polar import (
    COMPILE_BACKENDS,
    NS_FORMS,
    NS_PRESETS,
    PolarMethod,
    polar,
)

__all__ = [
    "COMPUTE_DTYPES",
    "NORMS",
    "POLAR_OPTIONS",
    "SHAPE_RULES",
    "BiasRMS",
    "ColNorm",
    "Euclidean",
    "Norm",
    "PolarNorm",
    "RowNorm",
    "Sign",
    "SignUnscaled",
    "Spectral",
    "SpectralConv",
    "get",
    "shape_factor",
]

ShapeRule = Literal["rms", "muon", "moonlight", "none"]

#: Shape rules for the spectral norm: the factor ``c`` in ``lmo(G) = -c U V^T``, from the
#: (flattened) 2-D shape ``(d_out, d_in)``.
SHAPE_RULES: dict[str, Callable[[int, int], float]] = {
    # Scion / Gluon RMS->RMS operator norm: ||A|| = sqrt(d_in/d_out) ||A||_2.
    "rms": lambda d_out, d_in: math.sqrt(d_out / d_in),
    # Keller Jordan's Muon and torch.optim.Muon adjust_lr_fn="original"; written exactly as torch
    # computes it so the step sizes agree bit for bit.
    "muon": lambda d_out, d_in: math.sqrt(max(1, d_out / d_in)),
    # Moonlight (Liu et al. 2025), torch adjust_lr_fn="match_rms_adamw": update RMS ~ 0.2.
    "moonlight": lambda d_out, d_in: 0.2 * math.sqrt(max(d_out, d_in)),
    # The plain spectral norm ||A||_2 (Muon without a shape adjustment).
    "none": lambda d_out, d_in: 1.0,
}

_DTYPES: dict[str, torch.dtype | None] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
    "input": None,
}


#: Values of the ``compute_dtype`` setting: the dtype Newton–Schulz runs in ("input": as given).
COMPUTE_DTYPES: tuple[str, ...] = tuple(_DTYPES)


def shape_factor(rule: str, d_out: int, d_in: int) -> float:
    """The spectral LMO factor ``c`` of shape rule ``rule`` for a ``(d_out, d_in)`` matrix."""
    try:
        fn = SHAPE_RULES[rule]
    except KeyError:
        raise ValueError(
            f"Unknown shape_rule {rule!r}; expected one of {sorted(SHAPE_RULES)}"
        ) from None
    return fn(d_out, d_in)


def _vnorm(x: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """The l2 norm over ``dim``, accurate where the squares of the entries underflow.

    ``sqrt(sum x^2)`` loses entries below ``sqrt(tiny)`` (about 1e-19 in float32): a momentum
    row that decays for hundreds of steps (a rare token's embedding) has a norm that rounds to
    0, and its LMO direction ``x / max(norm, tiny)`` comes out near 1e15 instead of unit size.
    Entries above ``sqrt(max)`` overflow the other way (the norm is inf and the direction 0).
    Where the plain norm is below ``sqrt(tiny / eps)`` or infinite it is recomputed scaled by
    the largest entry, ``m ||x / m||``; everywhere else it is the plain norm, bit for bit.

    The rescue costs three more passes over ``x``. On the CPU, where reading a flag costs no
    device synchronisation, it runs only when some norm needs it; on a GPU it always runs, as
    ``torch.where`` operands, so the step never waits on the device.
    """
    out: Tensor = torch.linalg.vector_norm(x, dim=dim, keepdim=keepdim)
    info = torch.finfo(out.dtype)
    # Too small to trust, or overflowed (entries above sqrt(max), about 1e19 in float32).
    small = (out < math.sqrt(info.tiny / info.eps)) | (out == math.inf)
    if x.device.type == "cpu" and not bool(small.any()):
        return out
    dims = tuple(range(x.ndim)) if dim is None else (dim,)
    peak = x.abs().amax(dim=dims, keepdim=True).to(out.dtype).clamp(min=info.tiny)
    scaled = torch.linalg.vector_norm(x / peak, dim=dim, keepdim=keepdim)
    peak = peak if keepdim else (peak.reshape(()) if dim is None else peak.squeeze(dim))
    return torch.where(small, scaled * peak, out)


def _spectral_norm(x: Tensor) -> Tensor:
    out: Tensor = torch.linalg.matrix_norm(x, ord=2)
    return out


def _safe_div(x: Tensor, denom: Tensor) -> Tensor:
    # Dividing by a clamped denominator keeps exact zeros at zero (0 / tiny = 0): a zero gradient
    # block gives a zero step instead of NaN.
    return x / denom.clamp(min=torch.finfo(denom.dtype).tiny)


@dataclass(frozen=True)
class Norm(ABC):
    """Base class: a norm with its LMO written as ``lmo(g) = -factor(shape) * direction(g)``.

    Subclasses set ``name`` and ``kind`` and implement :meth:`direction`, :meth:`factor`,
    :meth:`dual` and :meth:`norm`. ``kind`` says what one "layer" is: ``"matrix"`` (last two
    dims, batched), ``"vector"`` (last dim, batched), ``"tensor"`` (the whole tensor) or
    ``"conv"`` (one whole kernel).
    """

    name: ClassVar[str] = ""
    kind: ClassVar[Literal["matrix", "vector", "tensor", "conv"]] = "tensor"

    # -- the pieces -------------------------------------------------------------------------
    @abstractmethod
    def direction(self, g: Tensor) -> Tensor:
        """The unscaled direction ``D`` with ``lmo(g) = -factor(g.shape) * D``."""

    def factor(self, shape: torch.Size | tuple[int, ...]) -> float:
        """The scalar factor of the LMO for a tensor of this shape."""
        return 1.0

    def reads_as(self, dtype: torch.dtype) -> torch.dtype:
        """The narrowest dtype an operand of ``dtype`` can be cast to first without changing
        :meth:`direction`'s result, bit for bit.

        Distributed steps send operands to their owner rank in it. Most norms read every bit
        of their operand, so the default is ``dtype`` itself.
        """
        return dtype

    # -- the public triple ------------------------------------------------------------------
    def lmo(self, g: Tensor) -> Tensor:
        """``argmin_{||a|| <= 1} <g, a>``, same shape and dtype as ``g``; ``g`` is not modified."""
        self.check(g.shape)
        return self.direction(g).to(g.dtype) * (-self.factor(g.shape))

    @abstractmethod
    def dual(self, g: Tensor) -> Tensor:
        """The dual norm ``||g||_*`` (one value per layer of the batch)."""

    @abstractmethod
    def norm(self, x: Tensor) -> Tensor:
        """The primal norm ``||x||`` (one value per layer of the batch)."""

    # -- a parameter as this norm sees it ------------------------------------------------------
    def operand_shape(
        self,
        shape: torch.Size | tuple[int, ...],
        transposed: bool = False,
        blocks: str = _blocks.WHOLE,
    ) -> tuple[int, ...]:
        """The shape :meth:`operand` gives a tensor of ``shape``.

        A vector is never silently read as a one-column matrix: it keeps its shape, and a matrix
        norm's shape check then rejects it.
        """
        if self.kind == "matrix" and blocks != _blocks.WHOLE:
            return _blocks.parse(blocks).shape(tuple(shape), transposed)
        if self.kind == "matrix" and len(shape) >= 2:
            if transposed:
                return (shape[-1], math.prod(shape[:-1]))
            return (shape[0], math.prod(shape[1:]))
        return tuple(shape)

    def operand(self, t: Tensor, transposed: bool = False, blocks: str = _blocks.WHOLE) -> Tensor:
        """``t`` (shaped like a parameter) as this norm reads it.

        Matrix norms see a ``(d_out, d_in)`` matrix: conv kernels are flattened to
        ``(C_out, C_in*k*k)`` (shape rules then use the flattened shape, never kernel dimensions)
        and ``transposed`` parameters, stored ``(d_in, d_out)`` as ``nn.Embedding.weight`` or a
        Hugging Face ``Conv1D`` weight, are transposed. A transposed tensor with more than two
        dims (a ``(1, N, D)`` positional embedding) is read as ``(D, prod(leading dims))``: its
        last dim is the feature, the others index inputs. With ``blocks`` other than
        ``"whole"`` (:mod:`gluon_optim.blocks`) they see a batch of units ``(*units, d_out /
        K, d_in)``, a view of ``t``. Other norms see the tensor as it is.
        """
        if self.kind == "matrix":
            if blocks != _blocks.WHOLE:
                return _blocks.parse(blocks).view(t, transposed)
            if transposed:
                return t.T if t.ndim == 2 else t.reshape(-1, t.shape[-1]).T
            return t.reshape(t.shape[0], -1)
        return t

    def restore(
        self, t: Tensor, like: Tensor, transposed: bool = False, blocks: str = _blocks.WHOLE
    ) -> Tensor:
        """The inverse of :meth:`operand`: ``t`` back in the shape of the parameter ``like``."""
        if self.kind == "matrix":
            if blocks != _blocks.WHOLE:
                out = torch.empty(like.shape, dtype=t.dtype, device=t.device)
                _blocks.parse(blocks).view(out, transposed).copy_(t)
                return out
            if transposed:
                return t.T if like.ndim == 2 else t.T.reshape(like.shape)
            return t.reshape(like.shape)
        return t

    def dual_of(self, t: Tensor, transposed: bool = False, blocks: str = _blocks.WHOLE) -> Tensor:
        """``||t||_*`` of a parameter-shaped tensor, one scalar for the whole parameter.

        A parameter that holds several layers of this norm (a 2-D tensor under ``bias_rms``,
        the units of ``blocks``) is their product space with the max primal norm, whose dual
        is the sum of the duals.
        """
        return self.dual(self.operand(t, transposed, blocks)).sum()

    def norm_of(self, t: Tensor, transposed: bool = False, blocks: str = _blocks.WHOLE) -> Tensor:
        """``||t||`` of a parameter-shaped tensor: the max over the layers it holds."""
        return self.norm(self.operand(t, transposed, blocks)).amax()

    # -- shapes -----------------------------------------------------------------------------
    def shape_error(self, shape: torch.Size | tuple[int, ...]) -> str | None:
        """Why a tensor of ``shape`` does not fit this norm, or ``None`` when it does."""
        if self.kind == "matrix" and len(shape) < 2:
            return f"norm {self.name!r} needs a matrix (at least 2 dims), got shape {tuple(shape)}"
        if self.kind == "conv" and len(shape) < 3:
            return (
                f"norm {self.name!r} needs a conv kernel (C_out, C_in, *kernel), "
                f"got shape {tuple(shape)}"
            )
        if any(s == 0 for s in shape):
            return f"norm {self.name!r} got an empty tensor of shape {tuple(shape)}"
        return None

    def check(self, shape: torch.Size | tuple[int, ...]) -> None:
        """Raise ``ValueError`` if a tensor of ``shape`` does not fit this norm."""
        err = self.shape_error(shape)
        if err is not None:
            raise ValueError(err)

    def describe(self) -> str:
        """Short text for tables: the name plus any non-default options."""
        opts = [
            f"{f.name}={getattr(self, f.name)}"
            for f in fields(self)
            if getattr(self, f.name) != f.default
        ]
        return self.name + (f"({', '.join(opts)})" if opts else "")


def _sum_last(x: Tensor, n: int) -> Tensor:
    return x.sum(dim=tuple(range(-n, 0)))


@dataclass(frozen=True)
class _PolarNorm(Norm):
    """Shared options of the spectral norms: how ``U V^T`` is computed."""

    method: PolarMethod = "newton_schulz"
    ns_preset: str = "jordan"
    ns_steps: int = 5
    compute_dtype: str = "bfloat16"
    ns_form: str = "standard"
    compile: str = ""  # a torch.compile backend for Newton–Schulz ("" = eager PyTorch)

    def __post_init__(self) -> None:
        if self.method not in ("newton_schulz", "svd"):
            raise ValueError(
                f"Unknown polar method {self.method!r}; expected 'newton_schulz' or 'svd'"
            )
        if self.ns_preset not in NS_PRESETS:
            raise ValueError(
                f"Unknown ns_preset {self.ns_preset!r}; expected one of {sorted(NS_PRESETS)}"
            )
        if not isinstance(self.ns_steps, int) or not 1 <= self.ns_steps < 100:
            raise ValueError(f"Invalid ns_steps: {self.ns_steps!r} (need an int in [1, 100))")
        if self.compute_dtype not in _DTYPES:
            raise ValueError(
                f"Unknown compute_dtype {self.compute_dtype!r}; expected one of {sorted(_DTYPES)}"
            )
        if self.ns_form not in NS_FORMS:
            raise ValueError(f"Unknown ns_form {self.ns_form!r}; expected one of {list(NS_FORMS)}")
        if self.compile not in ("", *COMPILE_BACKENDS):
            raise ValueError(
                f"Unknown compile backend {self.compile!r}; expected '' or one of "
                f"{list(COMPILE_BACKENDS)}"
            )

    def reads_as(self, dtype: torch.dtype) -> torch.dtype:
        # Newton–Schulz in bfloat16 casts a float32 or bfloat16 operand to bfloat16 before its
        # first operation (polar._normalised_wide; float16 and float64 inputs are normalised
        # first, and the SVD runs in float32 or wider), so nothing else of it is ever read.
        if (
            self.method == "newton_schulz"
            and self.compute_dtype == "bfloat16"
            and dtype in (torch.float32, torch.bfloat16)
        ):
            return torch.bfloat16
        return dtype

    def _polar(self, m: Tensor) -> Tensor:
        return polar(
            m,
            method=self.method,
            preset=self.ns_preset,
            steps=self.ns_steps,
            dtype=_DTYPES[self.compute_dtype],
            form=self.ns_form,
            compile=self.compile,
        )

    def dual(self, g: Tensor) -> Tensor:
        # ||g||_* = -<g, lmo(g)> = f <g, U V^T> = f ||g||_nuc when U V^T is exact; with
        # Newton–Schulz it is the dual norm the optimizer's own LMO implies.
        self.check(g.shape)
        d = self.direction(g).to(g.dtype)
        dims = 2 if self.kind == "matrix" else g.ndim
        return self.factor(g.shape) * _sum_last(g * d, dims)


#: The spectral norms' common base, for "does this norm compute a polar factor" checks.
PolarNorm = _PolarNorm

#: The param-group settings that configure a :class:`PolarNorm`, each with the field it sets.
POLAR_OPTIONS: dict[str, str] = {
    "polar_method": "method",
    "ns_preset": "ns_preset",
    "ns_steps": "ns_steps",
    "compute_dtype": "compute_dtype",
    "ns_form": "ns_form",
    "compile": "compile",
}


@dataclass(frozen=True)
class Spectral(_PolarNorm):
    """Scaled spectral norm ``||A|| = ||A||_2 / c(d_out, d_in)``; ``lmo(G) = -c U V^T``.

    With ``shape_rule="rms"`` this is the RMS->RMS operator norm ``sqrt(d_in/d_out) ||A||_2`` of
    Scion and Gluon; ``"muon"`` gives Muon's ``sqrt(max(1, d_out/d_in))``; see :data:`SHAPE_RULES`.
    The dual norm is ``c ||G||_nuc``.
    """

    name: ClassVar[str] = "spectral"
    kind: ClassVar[Literal["matrix", "vector", "tensor", "conv"]] = "matrix"
    shape_rule: str = "rms"

    def __post_init__(self) -> None:
        super().__post_init__()
        shape_factor(self.shape_rule, 1, 1)  # validates the name

    def factor(self, shape: torch.Size | tuple[int, ...]) -> float:
        return shape_factor(self.shape_rule, shape[-2], shape[-1])

    def direction(self, g: Tensor) -> Tensor:
        return self._polar(g)

    def norm(self, x: Tensor) -> Tensor:
        self.check(x.shape)
        return _spectral_norm(x) / self.factor(x.shape)


@dataclass(frozen=True)
class SpectralConv(_PolarNorm):
    """Spectral norm of a conv kernel ``(C_out, C_in, *k)`` flattened to ``(C_out, C_in·K)``.

    ``||W|| = K sqrt(C_in/C_out) ||W_flat||_2`` with ``K = prod(k)`` (``k^2`` for a square 2-D
    kernel), so ``lmo(G) = -(sqrt(C_out/C_in)/K) U V^T`` and ``||G||_* = (sqrt(C_out/C_in)/K)
    ||G_flat||_nuc``. This is Scion's ``SpectralConv``; for Conv1d ``K = k``.
    """

    name: ClassVar[str] = "spectral_conv"
    kind: ClassVar[Literal["matrix", "vector", "tensor", "conv"]] = "conv"

    def factor(self, shape: torch.Size | tuple[int, ...]) -> float:
        c_out, c_in = shape[0], shape[1]
        return math.sqrt(c_out / c_in) / math.prod(shape[2:])

    def direction(self, g: Tensor) -> Tensor:
        return self._polar(g.reshape(g.shape[0], -1)).reshape(g.shape)

    def norm(self, x: Tensor) -> Tensor:
        self.check(x.shape)
        flat = x.reshape(x.shape[0], -1)
        return _spectral_norm(flat) / self.factor(x.shape)


@dataclass(frozen=True)
class _LineNorm(Norm):
    """A max over lines (columns or rows) of their scaled l2 norms; ``axis`` picks the lines.

    ``axis = -2`` reduces over rows, so each column is a line; ``axis = -1`` each row is one.
    The direction normalises every line; the dual sums the line norms times ``factor``.
    """

    kind: ClassVar[Literal["matrix", "vector", "tensor", "conv"]] = "matrix"
    axis: ClassVar[int] = -2

    def direction(self, g: Tensor) -> Tensor:
        return _safe_div(g, _vnorm(g, dim=self.axis, keepdim=True))

    def dual(self, g: Tensor) -> Tensor:
        self.check(g.shape)
        return self.factor(g.shape) * _vnorm(g, dim=self.axis).sum(-1)

    def norm(self, x: Tensor) -> Tensor:
        self.check(x.shape)
        return _vnorm(x, dim=self.axis).amax(-1) / self.factor(x.shape)


@dataclass(frozen=True)
class ColNorm(_LineNorm):
    """Max column norm (1->RMS): ``||A|| = max_j ||A[:, j]||_2 / sqrt(d_out)``.

    ``lmo`` maps each column to ``-sqrt(d_out) col_j / ||col_j||``; ``||G||_* = sqrt(d_out)
    sum_j ||col_j||``. For a token embedding stored as ``(vocab, dim)`` the optimizer applies it
    to the transpose, so each token's vector is normalised (Scion's ``ColNorm(transpose=True)``).
    """

    name: ClassVar[str] = "colnorm"
    axis: ClassVar[int] = -2

    def factor(self, shape: torch.Size | tuple[int, ...]) -> float:
        return math.sqrt(shape[-2])


@dataclass(frozen=True)
class RowNorm(_LineNorm):
    """Max row norm (RMS->inf): ``||A|| = max_i sqrt(d_in) ||A[i, :]||_2``.

    ``lmo`` maps each row to ``-row_i / (sqrt(d_in) ||row_i||)``; ``||G||_* = sum_i ||row_i||
    / sqrt(d_in)``.
    """

    name: ClassVar[str] = "rownorm"
    axis: ClassVar[int] = -1

    def factor(self, shape: torch.Size | tuple[int, ...]) -> float:
        return 1.0 / math.sqrt(shape[-1])


@dataclass(frozen=True)
class Sign(Norm):
    """Scaled max-norm (1->inf): ``||A|| = d_in max_ij |A_ij|``.

    ``lmo(G) = -sign(G) / d_in``; ``||G||_* = sum_ij |G_ij| / d_in``. Scion's output layer
    (``Sign(normalized=True)``) and Gluon's ``n_p ||.||_{1->inf}`` for the tied embedding.
    """

    name: ClassVar[str] = "sign"
    kind: ClassVar[Literal["matrix", "vector", "tensor", "conv"]] = "matrix"

    def factor(self, shape: torch.Size | tuple[int, ...]) -> float:
        return 1.0 / shape[-1]

    def direction(self, g: Tensor) -> Tensor:
        return torch.sign(g)

    def dual(self, g: Tensor) -> Tensor:
        self.check(g.shape)
        return self.factor(g.shape) * g.abs().sum(dim=(-2, -1))

    def norm(self, x: Tensor) -> Tensor:
        self.check(x.shape)
        return x.abs().amax(dim=(-2, -1)) / self.factor(x.shape)


@dataclass(frozen=True)
class SignUnscaled(Norm):
    """The max-norm ``max |A_ij|`` of the whole tensor: ``lmo(G) = -sign(G)``, dual ``||G||_1``.

    With no momentum, Gluon with this norm is sign-SGD.
    """

    name: ClassVar[str] = "sign_unscaled"
    kind: ClassVar[Literal["matrix", "vector", "tensor", "conv"]] = "tensor"

    def direction(self, g: Tensor) -> Tensor:
        return torch.sign(g)

    def dual(self, g: Tensor) -> Tensor:
        self.check(g.shape)
        return g.abs().sum()

    def norm(self, x: Tensor) -> Tensor:
        self.check(x.shape)
        return x.abs().amax()


@dataclass(frozen=True)
class Euclidean(Norm):
    """The Frobenius / l2 norm of the whole tensor: ``lmo(G) = -G / ||G||_F``, self-dual.

    With no momentum, Gluon with this norm is layer-wise normalised gradient descent.
    """

    name: ClassVar[str] = "euclidean"
    kind: ClassVar[Literal["matrix", "vector", "tensor", "conv"]] = "tensor"

    def direction(self, g: Tensor) -> Tensor:
        return _safe_div(g, _vnorm(g))

    def dual(self, g: Tensor) -> Tensor:
        self.check(g.shape)
        return _vnorm(g)

    def norm(self, x: Tensor) -> Tensor:
        self.check(x.shape)
        return _vnorm(x)


@dataclass(frozen=True)
class BiasRMS(Norm):
    """RMS norm of a vector: ``||b|| = ||b||_2 / sqrt(d)``.

    ``lmo(g) = -sqrt(d) g / ||g||_2``; ``||g||_* = sqrt(d) ||g||_2``. Used for biases and norm
    gains (Scion's ``BiasRMS``). A 0-d tensor counts as a vector of length 1.
    """

    name: ClassVar[str] = "bias_rms"
    kind: ClassVar[Literal["matrix", "vector", "tensor", "conv"]] = "vector"

    def factor(self, shape: torch.Size | tuple[int, ...]) -> float:
        return math.sqrt(shape[-1]) if len(shape) else 1.0

    def direction(self, g: Tensor) -> Tensor:
        if g.ndim == 0:
            return torch.sign(g)
        return _safe_div(g, _vnorm(g, dim=-1, keepdim=True))

    def dual(self, g: Tensor) -> Tensor:
        self.check(g.shape)
        if g.ndim == 0:
            return g.abs()
        return self.factor(g.shape) * _vnorm(g, dim=-1)

    def norm(self, x: Tensor) -> Tensor:
        self.check(x.shape)
        if x.ndim == 0:
            return x.abs()
        return _vnorm(x, dim=-1) / self.factor(x.shape)


#: Every norm by name.
NORMS: dict[str, type[Norm]] = {
    cls.name: cls
    for cls in (Spectral, SpectralConv, ColNorm, RowNorm, Sign, SignUnscaled, Euclidean, BiasRMS)
}


def get(name: str, **options: object) -> Norm:
    """Build the norm ``name`` with ``options`` (for example ``shape_rule``, ``method``).

    Raises ``ValueError`` naming the norm or the option when either is unknown or invalid.
    """
    try:
        cls = NORMS[name]
    except KeyError:
        raise ValueError(f"Unknown norm {name!r}; expected one of {sorted(NORMS)}") from None
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"Norm {name!r} does not take option(s) {unknown}; it takes {sorted(known) or 'none'}"
        )
    return cls(**options)
