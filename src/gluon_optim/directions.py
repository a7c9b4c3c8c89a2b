"""The direction stage's executors: where each whole-tensor LMO of a step is computed.

The optimizer hands its executor a list of :class:`DirectionRequest` (one per LMO parameter
with a gradient) and gets a :class:`DirectionResult` for each: the direction ``D`` of
``lmo(M) = -f D`` and, where the radius policy asks for it, the dual norm of the gradient. The
executor also settles the step's decisions that must be the same everywhere (which parameters
have a gradient, which gradients are finite), because a distributed executor must agree on
them across ranks before anything changes.

:class:`LocalExecutor` computes everything in this process; the distributed executors of
:mod:`gluon_optim.distributed` compute each request once, on its owner rank, and exchange the
results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from gluon_optim.norms import Norm

__all__ = [
    "DirectionRequest",
    "DirectionResult",
    "LocalExecutor",
    "OwnerEstimate",
    "ShardLayout",
    "compute",
    "dual_shape",
]


@dataclass(frozen=True)
class ShardLayout:
    """How a request's tensors are laid out when they are this rank's part of a DTensor.

    Attributes:
        shape: the whole parameter's shape.
        transposed: the group's ``transposed`` (the owner builds the norm's view of the whole).
        sharded: ``True`` for ``Shard(0)`` (this rank holds rows ``[start, stop)`` of dim 0, as
            ``torch.chunk`` splits them), ``False`` for ``Replicate()`` (it holds the whole).
        blocks: the group's ``blocks``. A stack of experts (``"experts"``, with or without a
            split within each expert) split along dim 0 holds whole experts on every rank, so
            each rank computes the LMO units of its own rows, with no exchange.
    """

    shape: tuple[int, ...]
    transposed: bool
    sharded: bool
    blocks: str = "whole"


@dataclass(frozen=True)
class OwnerEstimate:
    """An estimator whose state is not elementwise, run by the owner on whole tensors.

    LiMuon's low-rank momentum keeps the factors of a randomized SVD of the whole momentum,
    which no rank can update from its rows alone. Under ``distributed="sharded"`` the
    request's ``operand`` is then this rank's rows of the gradient ``g``; the owner assembles
    ``g`` (and ``partner``, the rows of ``g_prev``), calls ``run`` to get the momentum and the
    new state, takes the LMO of that momentum, and sends the new state to every rank, where
    ``commit`` stores it: the state is whole, and the same, on every rank.

    Attributes:
        partner: this rank's rows of ``g_prev``, or ``None`` on a first step.
        run: ``(g, g_prev) -> (M, new state)`` on whole parameter-shaped tensors.
        state: the new state's ``{key: (shape, dtype)}``, for the ranks that receive it.
        commit: stores the new state (whole tensors) on this rank.
    """

    partner: Tensor | None
    run: Callable[[Tensor, Tensor | None], tuple[Tensor, dict[str, Tensor]]]
    state: dict[str, tuple[tuple[int, ...], torch.dtype]]
    commit: Callable[[dict[str, Tensor]], None]


@dataclass(frozen=True)
class DirectionRequest:
    """One LMO to compute: ``norm.direction(operand)``, and a dual norm if the radius needs one.

    Attributes:
        key: the parameter's position among the optimizer's LMO parameters, ``(group index,
            index in the group)``; the same on every rank, so it names the parameter's owner.
        norm: the parameter's norm.
        operand: the momentum as the norm reads it.
        batch: may be stacked with requests of the same norm, shape, dtype and device into one
            batched call (the group's ``foreach``).
        dual: which dual norm the radius policy needs: of the ``"gradient"`` (``gradient``,
            in the norm's view), of the ``"momentum"`` (``f <M, D>``, free from the
            direction), or none. Whole-tensor reductions, so they are computed with the
            direction, by whoever computes it.
        gradient: the gradient in the norm's view, for ``dual="gradient"``.
        layout: ``None``, or, under FSDP2, how ``operand`` and ``gradient`` are this rank's
            rows of the parameter: they are then in the PARAMETER's layout (not the norm's
            view), and so is the direction of the result.
        estimate: with ``layout``, an estimator the owner runs on whole tensors; ``operand``
            is then this rank's rows of the gradient.
    """

    key: tuple[int, int]
    norm: Norm
    operand: Tensor
    batch: bool
    dual: Literal["gradient", "momentum"] | None = None
    gradient: Tensor | None = None
    layout: ShardLayout | None = None
    estimate: OwnerEstimate | None = None


@dataclass(frozen=True)
class DirectionResult:
    """The direction ``D`` of a request, and the dual norm it asked for (else ``None``)."""

    direction: Tensor
    dual: Tensor | None


def compute(requests: Sequence[DirectionRequest]) -> list[DirectionResult]:
    """Every request's direction and dual, here; stacked where ``batch`` allows."""
    out: list[Tensor | None] = [None] * len(requests)
    buckets: dict[tuple[Any, ...], list[int]] = {}
    for j, r in enumerate(requests):
        # Only norms that act on the last one or two dims batch over a new leading one.
        stackable = r.batch and (
            r.norm.kind == "matrix" or (r.norm.kind == "vector" and r.operand.ndim >= 1)
        )
        op = r.operand
        key = (r.norm, tuple(op.shape), op.dtype, op.device) if stackable else (j,)
        buckets.setdefault(key, []).append(j)
    for idx in buckets.values():
        norm = requests[idx[0]].norm
        if len(idx) == 1:
            out[idx[0]] = norm.direction(requests[idx[0]].operand)
            continue
        stacked = norm.direction(torch.stack([requests[j].operand for j in idx]))
        for j, d in zip(idx, stacked.unbind(0), strict=True):
            out[j] = d
    results = []
    for r, direction in zip(requests, out, strict=True):
        assert direction is not None
        results.append(DirectionResult(direction, _dual(r, direction)))
    return results


def dual_shape(r: DirectionRequest) -> tuple[int, ...]:
    """The shape of a request's dual norm: one per LMO unit (see :func:`_dual`)."""
    units = r.norm.kind == "matrix" and r.operand.ndim > 2
    return tuple(r.operand.shape[:-2]) if units else ()


def _dual(r: DirectionRequest, d: Tensor) -> Tensor | None:
    """The dual norm a request asked for: one per LMO unit.

    An operand of a matrix norm with more than two dims is a batch of units (a blocked
    parameter, :mod:`gluon_optim.blocks`), each a layer with its own radius, so it gets one
    dual per unit; any other operand is one layer, whose dual sums those of the rows or
    vectors it holds (the product space of a 2-D tensor under ``bias_rms``).
    """
    units = bool(dual_shape(r))
    if r.dual == "gradient":
        assert r.gradient is not None
        dual = r.norm.dual(r.gradient)
        return dual if units else dual.sum()
    if r.dual == "momentum":
        # -<M, lmo(M)> = f <M, D>: the dual norm comes free from the direction.
        op = r.operand
        inner = op * d.to(op.dtype)
        return r.norm.factor(op.shape) * (inner.sum((-2, -1)) if units else inner.sum())
    return None


def to_host(flags: list[Tensor]) -> list[bool]:
    """Boolean scalars to Python, with one transfer per device rather than one per tensor.

    Copying each flag to the host on its own would synchronise once per parameter on a GPU.
    """
    by_device: dict[torch.device, list[int]] = {}
    for i, f in enumerate(flags):
        by_device.setdefault(f.device, []).append(i)
    out = [False] * len(flags)
    for positions in by_device.values():
        values = torch.stack([flags[i] for i in positions]).tolist()
        for i, v in zip(positions, values, strict=True):
            out[i] = bool(v)
    return out


class LocalExecutor:
    """Computes every direction in this process; its decisions need no agreement."""

    #: ``"local"``: the ``distributed`` mode this executor implements.
    mode = "local"
    #: Whether estimators whose state is not elementwise (LiMuon's low-rank factors) hand it
    #: an :class:`OwnerEstimate` to run once, on the owner, instead of running here.
    owner_estimates = False
    #: Whether every parameter's state must exist before the first step (FSDP2's checkpoints
    #: load into the keys a fresh optimizer already holds): the optimizer then creates it at
    #: construction, for added groups and for parameters a loaded state lacks.
    materializes_state = False
    #: Whether an unexpected error found on one rank must be settled across ranks
    #: (:meth:`settle`) instead of raised at once, so no rank is left waiting for the others.
    settles_errors = False

    def settle(self, error: str | None) -> None:
        """Raise ``ValueError(error)`` if there is one (a distributed executor raises the first
        rank's error on every rank, so a check that fails on one rank's shard stops them all)."""
        if error is not None:
            raise ValueError(error)

    def agree(self, has_grad: list[bool], finite: list[Tensor | None]) -> list[bool]:
        """Per parameter, whether its gradient is finite (in one process, ``has_grad`` is
        already what every rank sees).

        ``finite[i]`` is a device boolean, or ``None`` where nothing was checked (no gradient,
        or ``nonfinite="ignore"``), which counts as finite.
        """
        checked = [i for i, f in enumerate(finite) if f is not None]
        values = to_host([f for f in finite if f is not None])
        out = [True] * len(finite)
        for i, v in zip(checked, values, strict=True):
            out[i] = v
        return out

    def directions(self, requests: Sequence[DirectionRequest]) -> list[DirectionResult]:
        """The result of every request, in order."""
        return compute(requests)
