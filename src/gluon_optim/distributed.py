"""Distributed steps on ``torch.distributed``: every whole-tensor LMO computed once, by its owner.

``Gluon(..., distributed=MODE, process_group=None)``:

* ``"local"``: never communicates. Every process computes every direction (what a plain
  optimizer does under DDP).
* ``"replicated"``: parameters are plain tensors, identical on every rank (DDP). Every rank
  runs the elementwise stages (momentum, variance reduction, AdamW, the apply) on every
  parameter, so the optimizer state stays complete and identical everywhere; the direction
  stage is split: each LMO parameter has one owner rank, which computes its direction (and the
  gradient's dual norm for the ``l0l1`` radius) on the whole tensor, and one
  ``all_gather_into_tensor`` per direction dtype hands every rank every direction. The result
  equals one process bit for bit given the same gradients.
* ``"sharded"``: parameters are DTensors (FSDP2's ``fully_shard``), ``Shard(0)`` or
  ``Replicate()`` on a 1-D mesh. Every elementwise stage runs on this rank's rows only, with the
  state kept as DTensors laid out like the parameters; each LMO parameter's owner assembles the
  whole momentum from every rank's rows and sends every rank its rows of the direction: one
  ``all_to_all_single`` each way per step, split into :data:`EXCHANGE_CHUNKS` asynchronous
  ones (:class:`ShardedExecutor`). Newton–Schulz on a local shard
  would be a different algorithm, so there is no such fallback.
* ``"auto"`` (default): ``"sharded"`` for DTensor parameters, ``"local"`` for plain tensors.

Owners come from :func:`assign_owners`: longest-processing-time first on :func:`lmo_cost`,
computed from shapes alone, so every rank derives the same table; each rank checks once (one
``all_gather_object`` of a digest) that the others derived it from the same parameters, so
ranks whose param groups differ fail with a clear error instead of hanging or diverging.

Before anything changes, every step agrees across ranks on which parameters have a gradient
and which gradients are finite (one ``all_reduce``), so a NaN on one rank raises (or skips) on
every rank, and a gradient missing on some ranks only is an error on all of them.

Bytes sent per rank per step (ring all-gather, ``L_d`` = the largest rank's total of direction
elements of dtype ``d``, padded): ``(W - 1) * sum_d L_d * itemsize(d)``, plus ``(W - 1) * 8 *
(largest rank's number of l0l1 duals)`` and ``(W - 1) * 4 * 2 N`` for the agreement over ``N``
parameters. With balanced owners ``L_d ~ P_d / W``, i.e. ``(W - 1) / W * 2`` bytes per matrix
element for bfloat16 directions. :attr:`ReplicatedExecutor.last_bytes` records the step's count.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor, Replicate, Shard

from gluon_optim.directions import (
    DirectionRequest,
    DirectionResult,
    LocalExecutor,
    ShardLayout,
    compute,
)
from gluon_optim.norms import POLAR_OPTIONS, Norm, PolarNorm

__all__ = [
    "MODES",
    "EXCHANGE_CHUNKS",
    "LocalState",
    "ReplicatedExecutor",
    "ShardedExecutor",
    "assign_owners",
    "check_mode",
    "executor",
    "is_dtensor",
    "layout_error",
    "lmo_cost",
    "local",
    "rows",
    "shard_like",
    "sharded_bytes",
]

MODES = ("auto", "sharded", "replicated", "local")


def _all_gather_single() -> Callable[..., Any]:
    """torch 2.13 renamed ``all_gather_into_tensor`` to ``all_gather_single``; older torch has
    only the first (looked up at call time, so a wrapper installed on either is honoured)."""
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _Optimizer(Protocol):
    param_groups: list[dict[str, Any]]


def check_mode(mode: object) -> None:
    """Raise ``ValueError`` unless ``mode`` is one of :data:`MODES`."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"Unknown distributed {mode!r}; expected one of {MODES}")


def lmo_cost(norm: Norm, shape: Sequence[int], ns_steps: int) -> int:
    """The cost model of the owner assignment: Newton–Schulz work, or the element count.

    Spectral norms cost ``steps * max(m, n) * min(m, n)^2`` multiply-adds for an ``m x n``
    operand; every other LMO is elementwise or a reduction, ``numel``.
    """
    numel = 1
    for s in shape:
        numel *= s
    if isinstance(norm, PolarNorm) and len(shape) >= 2:
        m, n = shape[0], numel // shape[0]
        return ns_steps * max(m, n) * min(m, n) ** 2
    return numel


def sharded_bytes(
    shapes: Sequence[Sequence[int]],
    owners: Sequence[int],
    world: int,
    in_bytes: int = 2,
    out_bytes: int = 2,
) -> list[int]:
    """Bytes each rank sends per step in ``"sharded"`` mode for ``Shard(0)`` parameters.

    Rank ``r`` sends its rows of every matrix it does not own (``in_bytes`` per element: 2 for
    bfloat16 Newton–Schulz) and, for each matrix it owns, every other rank's rows of the
    direction (``out_bytes`` per element); each part is padded to 8 bytes, and every rank sends
    every other one an 8-byte status. The mean over ranks is ``(W - 1) P / W^2 * (in_bytes +
    out_bytes)`` (plus the statuses) when the rows split evenly.
    """
    sent = [0] * world
    for shape, owner in zip(shapes, owners, strict=True):
        per_row = math.prod(shape[1:])
        counts = [b - a for a, b in (rows(shape[0], world, r) for r in range(world))]
        for r in range(world):
            if r == owner:
                sent[r] += sum(
                    _padded(c * per_row * out_bytes) for s, c in enumerate(counts) if s != r
                )
            else:
                sent[r] += _padded(counts[r] * per_row * in_bytes)
    # Every rank also sends every other rank an 8-byte status in each message of phase 2.
    return [b + _STATUS * (world - 1) * EXCHANGE_CHUNKS for b in sent]


def assign_owners(
    costs: Sequence[int], world: int, kinds: Sequence[Any] | None = None
) -> list[int]:
    """Longest-processing-time owners: the costliest item first, to the least loaded rank.

    Ties (equal cost) go by ``kinds`` (sortable, e.g. the shapes), then in item order, and to
    the lowest rank, so the table depends only on the costs, the kinds and ``world``. Sorting
    equal costs by kind deals each kind out in turn: a tall ``(4n, n)`` and a wide ``(n, 4n)``
    matrix cost the same Newton–Schulz multiply-adds but not the same time (the tall one is
    transposed), and without it alternating ties could give one rank every tall matrix.
    """
    loads = [0] * world
    owners = [0] * len(costs)
    kind = list(kinds) if kinds is not None else [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], kind[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += costs[i]
    return owners


@dataclass(frozen=True)
class _Plan:
    """The owner of every LMO parameter, by request key."""

    signature: tuple[Any, ...]
    owners: dict[tuple[int, int], int]
    costs: dict[tuple[int, int], int]


#: The group settings that decide a parameter's norm (and so its cost and direction dtype).
_NORM_KEYS = ("algorithm", "norm", "shape_rule", "transposed", *POLAR_OPTIONS)
#: ... and those that decide what else its exchange carries (a dual norm, gradient rows, an
#: owner-run estimator with its partner and factors): ranks must agree on all of them, or the
#: message sizes they expect would differ.
_EXCHANGE_KEYS = ("radius_policy", "radius_source", "estimator", "two_point", "rank")
_PLAN_KEYS = (*_NORM_KEYS, *_EXCHANGE_KEYS)


def _lmo_params(
    optimizer: _Optimizer,
) -> Iterator[tuple[tuple[int, int], str, Tensor, dict[str, Any]]]:
    for gi, group in enumerate(optimizer.param_groups):
        if group["algorithm"] != "lmo":
            continue
        names = group.get("param_names")
        for pi, p in enumerate(group["params"]):
            yield (gi, pi), str(names[pi]) if names else f"params[{pi}]", p, group


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 parameter, its grad)."""
    return isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's part of a DTensor (its storage: writing to it writes the DTensor), or ``t``.

    The sharded step runs every elementwise stage on these local tensors, so no operation of
    the step dispatches through DTensor (whose reductions would communicate implicitly).
    """
    return t._local_tensor if isinstance(t, DTensor) else t  # noqa: SLF001 - to_local() without autograd


def rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of dim 0 (length ``n``) that ``Shard(0)`` gives ``rank``.

    ``torch.chunk``'s split, which DTensor and FSDP2 use: chunks of ``ceil(n / world)`` rows,
    the last ones shorter or empty.
    """
    size = -(-n // world)
    start = min(rank * size, n)
    return start, min(start + size, n)


def shard_like(value: Tensor, like: DTensor) -> DTensor:
    """A whole tensor shaped like DTensor ``like``, as a DTensor laid out like it: this rank
    keeps its rows (no communication: every rank holds the whole ``value``)."""
    (placement,) = like.placements
    part = value.to(local(like).device).contiguous()
    if placement.is_shard():
        mesh = like.device_mesh
        start, stop = rows(value.shape[0], mesh.size(), mesh.get_local_rank())
        # A copy of the rows, so the whole tensor is not kept alive on every rank.
        part = part[start:stop].clone()
    return _laid_out_like(part, like)


def _laid_out_like(part: Tensor, like: DTensor) -> DTensor:
    """``part`` (this rank's part of a tensor shaped like ``like``) as a DTensor like it."""
    return DTensor.from_local(
        part,
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )


class LocalState(MutableMapping[str, Any]):
    """A parameter's optimizer state as the sharded step sees it: DTensors read as their local
    tensors, and a new tensor of the parameter's local shape stored as a DTensor laid out like
    the parameter (so ``state_dict()`` and ``torch.distributed.checkpoint`` see DTensors),
    except the keys in ``whole``, which every rank holds whole (LiMuon's factors)."""

    def __init__(
        self, state: dict[str, Any], like: DTensor, whole: frozenset[str] = frozenset()
    ) -> None:
        self._state = state
        self._like = like
        self._whole = whole

    def __getitem__(self, key: str) -> Any:
        value = self._state[key]
        return local(value) if isinstance(value, DTensor) else value

    def __setitem__(self, key: str, value: Any) -> None:
        # Every state tensor but the step count and the whole keys is shaped like the parameter.
        plain = isinstance(value, Tensor) and not isinstance(value, DTensor)
        if plain and key != "step" and key not in self._whole:
            if value.shape == local(self._like).shape:
                value = _laid_out_like(value, self._like)
        self._state[key] = value

    def __delitem__(self, key: str) -> None:
        del self._state[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)


class ReplicatedExecutor(LocalExecutor):
    """The ``"replicated"`` direction stage: owners compute, one all-gather per dtype shares.

    Attributes:
        last_bytes: bytes this rank sent in the last step's direction exchange: ``(W - 1)``
            times the all-gathered buffer of each dtype (the ring model of all-gather).
        last_agree_bytes: the size of the last step's agreement all-reduce (``8 N`` bytes for
            ``N`` parameters; a ring all-reduce sends ``2 (W - 1) / W`` times that).
        last_collectives: how many collectives the last step issued.
        last_owned: per direction dtype (and ``"dual"``), the elements each rank owned in the
            last step; the gathered buffer of a dtype is the largest of them.
    """

    mode = "replicated"
    owner_estimates = True

    def __init__(
        self,
        optimizer: _Optimizer,
        group: ProcessGroup | None,
        resolve_norm: Callable[[Mapping[str, Any], Tensor], Norm],
    ) -> None:
        self._optimizer = optimizer
        self._resolve_norm = resolve_norm
        self._group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        #: The group the executor communicates over (``None``: the default group).
        self.process_group = group
        self._plan: _Plan | None = None
        self._quick: tuple[Any, ...] = ()
        self._dtypes: dict[tuple[Any, ...], tuple[torch.dtype, torch.dtype | None]] = {}
        self.last_bytes = 0
        self.last_agree_bytes = 0
        self.last_collectives = 0
        self.last_owned: dict[str, list[int]] = {}

    # -- the owner table --------------------------------------------------------------------
    def plan(self) -> _Plan:
        """The owner table for the optimizer's current parameters, checked across ranks once.

        Rebuilt only when the parameters or the settings that decide their norms change: a
        step looks up a cheap key of those first.
        """
        quick = tuple(
            (tuple((id(p), p.shape, p.dtype) for p in g["params"]), *(g.get(k) for k in _PLAN_KEYS))
            for g in self._optimizer.param_groups
        )
        if self._plan is not None and self._quick == quick:
            return self._plan
        entries = []
        for key, name, p, group in _lmo_params(self._optimizer):
            norm = self._resolve_norm(group, p)
            shape = norm.operand_shape(p.shape, group["transposed"])
            dtype = f"{p.dtype}@{p.device.type}"
            exchange = tuple(f"{k}={group.get(k)}" for k in _EXCHANGE_KEYS)
            entries.append((key, name, shape, dtype, norm, group["ns_steps"], exchange))
        signature = tuple(
            (k, name, shape, dtype, n.describe(), *exchange)
            for k, name, shape, dtype, n, _, exchange in entries
        )
        if self._plan is not None and self._plan.signature == signature:
            self._quick = quick  # the change did not matter: skip this work from now on
            return self._plan
        self._check_same_everywhere(signature)
        costs = {e[0]: lmo_cost(e[4], e[2], e[5]) for e in entries}
        keys = list(costs)
        shapes = {e[0]: tuple(e[2]) for e in entries}
        table = assign_owners([costs[k] for k in keys], self.world, [shapes[k] for k in keys])
        owners = dict(zip(keys, table, strict=True))
        self._plan, self._quick = _Plan(signature, owners, costs), quick
        return self._plan

    def _check_same_everywhere(self, signature: tuple[Any, ...]) -> None:
        digest = hashlib.sha256(repr(signature).encode()).hexdigest()
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, (digest, signature), group=self._group)
        for rank, (other, theirs) in enumerate(gathered):
            if other == digest:
                continue
            diff = next(
                (
                    f"{a} here, {b} on rank {rank}"
                    for a, b in zip(signature, theirs, strict=False)
                    if a != b
                ),
                f"{len(signature)} LMO parameters here, {len(theirs)} on rank {rank}",
            )
            raise ValueError(
                f"distributed={self.mode!r}: rank {self.rank} and rank {rank} built different "
                f"parameter groups (first difference: {diff}). Every rank must build the "
                "optimizer from the same model with the same groups, in the same order."
            )

    def loads(self) -> list[int]:
        """The LMO cost each rank owns (the balance of :func:`assign_owners`)."""
        plan = self.plan()
        out = [0] * self.world
        for key, rank in plan.owners.items():
            out[rank] += plan.costs[key]
        return out

    # -- agreement ----------------------------------------------------------------------------
    def settle(self, error: str | None) -> None:
        """Raise the first rank's error on every rank (one ``all_gather_object``)."""
        errors: list[Any] = [None] * self.world
        dist.all_gather_object(errors, error, group=self._group)
        for rank, message in enumerate(errors):
            if message is not None:
                where = "" if rank == self.rank else f" (found on rank {rank})"
                raise ValueError(f"{message}{where}")

    def agree(self, has_grad: list[bool], finite: list[Tensor | None]) -> list[bool]:
        """Per parameter, whether its gradient is finite on every rank. Raises (having changed
        nothing) when a parameter has a gradient on some ranks only."""
        # The flags' device, or the parameters' (an NCCL group cannot reduce CPU tensors).
        first = next((local(p) for g in self._optimizer.param_groups for p in g["params"]), None)
        fallback = torch.device("cpu") if first is None else first.device
        device = next((f.device for f in finite if f is not None), fallback)
        present = torch.tensor(has_grad, dtype=torch.bool, device=device)
        yes = torch.ones((), dtype=torch.bool, device=device)
        ok = (
            torch.stack([yes if f is None else f.to(device) for f in finite]) if finite else present
        )
        counts = torch.cat([present, ok]).to(torch.int32)
        dist.all_reduce(counts, group=self._group)
        self.last_agree_bytes = counts.numel() * counts.element_size()
        self.last_bytes, self.last_collectives, self.last_owned = 0, 1, {}
        values = counts.tolist()
        grads, oks = values[: len(has_grad)], values[len(has_grad) :]
        split = [i for i, c in enumerate(grads) if 0 < c < self.world]
        if split:
            names = [name for name, _, _ in _named(self._optimizer)]
            raise RuntimeError(
                f"distributed={self.mode!r}: parameter(s) {[names[i] for i in split]} have a "
                f"gradient on {grads[split[0]]} of {self.world} ranks; every "
                "rank must compute the same gradients (a parameter unused on one rank only "
                "needs find_unused_parameters in DDP, or a zero gradient). Nothing was changed."
            )
        return [c == self.world for c in oks]

    # -- the directions -------------------------------------------------------------------------
    def _dtypes_of(
        self,
        r: DirectionRequest,
        operand: torch.dtype | None = None,
        ndim: int | None = None,
    ) -> tuple[torch.dtype, torch.dtype | None]:
        """The dtypes of a request's direction and dual, which non-owners need to unpack them,
        for an operand of ``operand``'s dtype and ``ndim`` dims in the norm's view (default:
        the request's own operand).

        The same computation on a one-element zero operand of the same dtypes and rank gives
        them without running the real LMO, once per kind of request.
        """
        operand = r.operand.dtype if operand is None else operand
        ndim = r.operand.ndim if ndim is None else ndim
        grad_dtype = None if r.gradient is None else r.gradient.dtype
        key = (r.norm, operand, ndim, r.dual, grad_dtype)
        if key not in self._dtypes:

            def zeros(dtype: torch.dtype) -> Tensor:
                return torch.zeros((1,) * ndim, dtype=dtype)

            gradient = None if grad_dtype is None else zeros(grad_dtype)
            probe = DirectionRequest(r.key, r.norm, zeros(operand), False, r.dual, gradient)
            (result,) = compute([probe])
            self._dtypes[key] = (
                result.direction.dtype,
                None if result.dual is None else result.dual.dtype,
            )
        return self._dtypes[key]

    def directions(self, requests: Sequence[DirectionRequest]) -> list[DirectionResult]:
        plan = self.plan()
        owner = [plan.owners[r.key] for r in requests]
        given = requests
        # Owner-run estimators (LiMuon's low-rank state): the owner turns the gradient into
        # the momentum; every request is then in the norm's view, as the others are.
        new_state: dict[int, dict[str, Tensor]] = {}
        mine = [j for j, o in enumerate(owner) if o == self.rank]
        # An owner whose own work fails must still take part in the exchanges, or the other
        # ranks would wait forever: it sends zeros and a failure status, and every rank raises.
        failure: Exception | None = None
        try:
            requests = [
                self._owner_view(r, j, owner[j] == self.rank, new_state)
                for j, r in enumerate(given)
            ]
            computed = dict(zip(mine, compute([requests[j] for j in mine]), strict=True))
        except Exception as e:
            failure = e
            requests = [self._owner_view(r, j, False, {}) for j, r in enumerate(given)]
            computed, new_state = self._view_stand_ins(given, requests, mine)
        kinds = [self._dtypes_of(r) for r in requests]
        dtypes = [k[0] for k in kinds]
        directions: list[Tensor | None] = [None] * len(requests)
        for n, dtype in enumerate(sorted(set(dtypes), key=str)):
            idx = [j for j in range(len(requests)) if dtypes[j] == dtype]
            # The first exchange also carries every rank's status.
            status = failure if n == 0 else False
            shared = self._share(requests, owner, computed, idx, dtype, status)
            for j, flat in zip(idx, shared, strict=True):
                directions[j] = flat.view(requests[j].operand.shape)
        duals = self._share_duals(requests, owner, computed, [k[1] for k in kinds])
        self._share_state(given, owner, new_state)
        out = []
        for j, (r, d) in enumerate(zip(given, directions, strict=True)):
            assert d is not None
            if r.layout is not None:  # back in the parameter's layout, as it came
                d = r.norm.restore(d, r.operand, r.layout.transposed)
            out.append(DirectionResult(d, duals.get(j)))
        return out

    def _view_stand_ins(
        self,
        given: Sequence[DirectionRequest],
        requests: Sequence[DirectionRequest],
        mine: Sequence[int],
    ) -> tuple[dict[int, DirectionResult], dict[int, dict[str, Tensor]]]:
        """Zeros shaped like the owned results and new state, sent when computing them failed
        (never applied: every rank raises after the first exchange)."""
        computed, new_state = {}, {}
        for j in mine:
            r = requests[j]
            direction_dtype, dual_dtype = self._dtypes_of(r)
            direction = torch.zeros(r.operand.shape, dtype=direction_dtype, device=r.operand.device)
            dual = None if dual_dtype is None else torch.zeros((), dtype=dual_dtype)
            computed[j] = DirectionResult(direction, dual)
            estimate = given[j].estimate
            if estimate is not None:
                new_state[j] = {
                    key: torch.zeros(shape, dtype=dtype, device=r.operand.device)
                    for key, (shape, dtype) in estimate.state.items()
                }
        return computed, new_state

    def _raise_for(self, statuses: Sequence[float], failure: Exception | None) -> None:
        """After the first exchange: this rank's own failure, or the other ranks'."""
        if failure is not None:
            raise failure
        failed = [rank for rank, status in enumerate(statuses) if status]
        if failed:
            raise RuntimeError(
                f"distributed={self.mode!r}: rank(s) {failed} failed computing the directions "
                "they own (their own error says why); the step raised on every rank before any "
                "LMO parameter moved (AdamW groups take their whole step earlier)"
            )

    @staticmethod
    def _owner_view(
        r: DirectionRequest, j: int, owned: bool, new_state: dict[int, dict[str, Tensor]]
    ) -> DirectionRequest:
        """Request ``r`` in the norm's view; an owner-run estimator runs here on its owner."""
        if r.estimate is None:
            return r
        assert r.layout is not None, "owner-run estimators come with a layout"
        transposed = r.layout.transposed
        momentum = r.operand  # non-owners: the gradient stands in for its shape and dtype
        if owned:
            momentum, new_state[j] = r.estimate.run(r.operand, r.estimate.partner)
        gradient = None if r.gradient is None else r.norm.operand(r.gradient, transposed)
        operand = r.norm.operand(momentum, transposed)
        return DirectionRequest(r.key, r.norm, operand, r.batch, r.dual, gradient)

    def _share_state(
        self,
        requests: Sequence[DirectionRequest],
        owner: list[int],
        new_state: dict[int, dict[str, Tensor]],
    ) -> None:
        """Every owner-run estimator's new state, from its owner to every rank (one all-gather
        per dtype), committed everywhere."""
        need = [j for j, r in enumerate(requests) if r.estimate is not None]
        by_dtype: dict[torch.dtype, list[int]] = {}
        for j in need:
            estimate = requests[j].estimate
            assert estimate is not None
            (dtype,) = {d for _, d in estimate.state.values()}
            by_dtype.setdefault(dtype, []).append(j)
        for dtype, idx in sorted(by_dtype.items(), key=lambda item: str(item[0])):

            def spec(j: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
                estimate = requests[j].estimate
                assert estimate is not None
                return estimate.state

            flat = self._exchange(
                idx,
                owner,
                lambda j: torch.cat([new_state[j][k].reshape(-1) for k in spec(j)]),
                lambda j: sum(math.prod(shape) for shape, _ in spec(j).values()),
                dtype,
                requests[idx[0]].operand.device,
                "state",
            )
            for j in idx:
                state, at = {}, 0
                for key, (shape, _) in spec(j).items():
                    n = math.prod(shape)
                    state[key] = flat[j][at : at + n].view(shape).clone()
                    at += n
                estimate = requests[j].estimate
                assert estimate is not None
                estimate.commit(state if owner[j] != self.rank else new_state[j])

    def _gather(self, local: Tensor) -> Tensor:
        out = local.new_empty(self.world * local.numel())
        _all_gather_single()(out, local, group=self._group)
        self.last_bytes += (self.world - 1) * local.numel() * local.element_size()
        self.last_collectives += 1
        return out.view(self.world, local.numel())

    def _exchange(
        self,
        idx: list[int],
        owner: list[int],
        local_values: Callable[[int], Tensor],
        size_of: Callable[[int], int],
        dtype: torch.dtype,
        device: torch.device,
        label: str,
        status: Exception | None | bool = False,
    ) -> dict[int, Tensor]:
        """Items ``idx``, each computed by its owner, on every rank: one all-gather.

        This rank packs ``local_values(j)`` (flat, ``size_of(j)`` long) of the items it owns,
        in order, into a buffer padded to the widest rank's; every item comes back as its flat
        slice of the gathered buffers. ``last_owned[label]`` records the sizes per rank. With
        ``status`` (``None``, or this rank's failure), each buffer starts with one element, 1
        where its rank failed, and every rank raises if any did (:meth:`_raise_for`).
        """
        by_rank: list[list[int]] = [[] for _ in range(self.world)]
        for j in idx:
            by_rank[owner[j]].append(j)
        head = 0 if status is False else 1
        sizes = [head + sum(size_of(j) for j in js) for js in by_rank]
        self.last_owned[label] = sizes
        local = torch.zeros(max(sizes), dtype=dtype, device=device)
        if head:
            local[0] = float(isinstance(status, Exception))
        offset = head
        for j in by_rank[self.rank]:
            n = size_of(j)
            local[offset : offset + n] = local_values(j)
            offset += n
        gathered = self._gather(local)
        if head:
            self._raise_for(
                gathered[:, 0].tolist(), status if isinstance(status, Exception) else None
            )
        out: dict[int, Tensor] = {}
        for rank, js in enumerate(by_rank):
            offset = head
            for j in js:
                n = size_of(j)
                out[j] = gathered[rank, offset : offset + n]
                offset += n
        return out

    def _share(
        self,
        requests: Sequence[DirectionRequest],
        owner: list[int],
        computed: dict[int, DirectionResult],
        idx: list[int],
        dtype: torch.dtype,
        status: Exception | None | bool = False,
    ) -> list[Tensor]:
        """The directions ``idx`` (all of ``dtype``), each from its owner, flattened (with
        every rank's status, see :meth:`_exchange`)."""
        out = self._exchange(
            idx,
            owner,
            lambda j: computed[j].direction.reshape(-1),
            lambda j: requests[j].operand.numel(),
            dtype,
            requests[idx[0]].operand.device,
            str(dtype).removeprefix("torch."),
            status,
        )
        return [out[j] for j in idx]

    def _share_duals(
        self,
        requests: Sequence[DirectionRequest],
        owner: list[int],
        computed: dict[int, DirectionResult],
        dtypes: list[torch.dtype | None],
    ) -> dict[int, Tensor]:
        """The dual norms the radius needs, each from its owner, in their own dtypes.

        Sent as float64, which holds every float32, bfloat16 and float16 value exactly.
        """
        need = [j for j, r in enumerate(requests) if r.dual is not None]
        if not need:
            return {}

        def value(j: int) -> Tensor:
            dual = computed[j].dual
            assert dual is not None
            return dual.to(torch.float64).reshape(1)

        out = self._exchange(
            need, owner, value, lambda j: 1, torch.float64, requests[need[0]].operand.device, "dual"
        )
        duals: dict[int, Tensor] = {}
        for j, flat in out.items():
            dtype = dtypes[j]
            assert dtype is not None
            duals[j] = flat[0].to(dtype)
        return duals


def _pack(parts: Sequence[Tensor]) -> list[Tensor]:
    """Tensors as flat bytes, each padded to a multiple of 8 so every part can be viewed back
    as its dtype where it lands in the receiving buffer."""
    out = []
    for t in parts:
        flat = t.contiguous().view(-1).view(torch.uint8)
        out.append(flat)
        pad = -flat.numel() % 8
        if pad:
            out.append(flat.new_zeros(pad))
    return out


#: Bytes of the status each rank sends every other rank in each message of the sharded phase 2.
_STATUS = 8
#: Each sharded phase is this many asynchronous all-to-alls, one per share of every owner's
#: matrices: an owner computes its first matrices while the rows of the others arrive, and
#: sends their directions while it computes the others.
EXCHANGE_CHUNKS = 2


def _padded(nbytes: int) -> int:
    return nbytes + (-nbytes % 8)


@dataclass(frozen=True)
class _Wire:
    """What one sharded request sends each way, derived the same way on every rank.

    ``inbound``: the dtypes of the row-shaped parts each rank sends the owner (the operand in
    what its norm reads, then the gradient or, for an owner-run estimator, ``g_prev``);
    ``direction`` / ``dual``: what comes back; ``state``: ``(key, shape, dtype)`` of the whole
    tensors an owner-run estimator sends every rank.
    """

    layout: ShardLayout
    row: int
    inbound: tuple[torch.dtype, ...]
    direction: torch.dtype
    dual: torch.dtype | None
    state: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]


class ShardedExecutor(ReplicatedExecutor):
    """The ``"sharded"`` direction stage (FSDP2): owners assemble whole tensors from shards.

    Every request is this rank's rows of a ``Shard(0)`` DTensor (or the whole of a
    ``Replicate()`` one), in the parameter's layout (:class:`ShardLayout`). Two phases of
    ``all_to_all_single`` calls, each one buffer of bytes with uneven splits:

    1. every rank sends each owner its rows of the owner's operands (cast to what the norm
       reads, :meth:`Norm.reads_as`: bfloat16 for bfloat16 Newton–Schulz) and, for the
       gradient-dual radius, of the gradients;
    2. each owner computes the direction of the whole tensor (and the dual norm), exactly as
       one process does, and sends every rank its rows of the direction (and the dual); each
       message starts with an 8-byte status.

    Each phase is :data:`EXCHANGE_CHUNKS` asynchronous all-to-alls, one per share of every
    owner's matrices: an owner computes its first share while the rows of the next arrive,
    and sends its directions while it computes the next.

    Each rank sends ``sum_j rows_r(j) * q_j * (a_j + b_j)`` bytes for the parameters ``j`` it
    does not own (``q_j`` elements per row, ``a_j`` / ``b_j`` the item sizes in and out) and
    receives the same for those it owns: with balanced shards and owners ``(W - 1) P / W^2 *
    (a + b)`` per rank, ``4 (W - 1) P / W^2`` for bfloat16 both ways. ``Replicate()``
    parameters send nothing in phase 1 and the whole direction from the owner to every rank.
    Nothing in the stage dispatches through DTensor, so nothing else communicates.

    Attributes (besides :class:`ReplicatedExecutor`'s):
        last_phase_bytes: the bytes this rank sent to other ranks in each phase of the last
            step (padding to 8 bytes per part and the statuses included); ``last_bytes`` is
            their sum.
    """

    mode = "sharded"
    last_phase_bytes: list[int]

    def _rows(self, layout: ShardLayout, rank: int) -> tuple[int, int]:
        n = layout.shape[0] if layout.shape else 1
        return rows(n, self.world, rank) if layout.sharded else (0, n)

    def directions(self, requests: Sequence[DirectionRequest]) -> list[DirectionResult]:
        plan = self.plan()
        world, me = self.world, self.rank
        self.last_phase_bytes = [0, 0]
        owner = [plan.owners[r.key] for r in requests]
        wires = [self._wire(r) for r in requests]
        device = requests[0].operand.device if requests else torch.device("cpu")

        def nrows(j: int, rank: int) -> int:
            layout = wires[j].layout
            start, stop = self._rows(layout, rank)
            return stop - start

        # -- phase 1: every rank's rows of the owners' operands -------------------------------
        def inbound(j: int, src: int) -> list[int]:
            """Bytes of each part ``src`` sends the owner of request ``j``."""
            w = wires[j]
            if not w.layout.sharded or owner[j] == src:
                return []
            return [_padded(nrows(j, src) * w.row * d.itemsize) for d in w.inbound]

        # In chunks, like phase 2 below: an owner assembles and computes its first matrices
        # while the rows of the others are still arriving.
        chunks = self._chunks(owner)
        arriving = []
        for chunk in chunks:
            outgoing: list[list[Tensor]] = [[] for _ in range(world)]
            for j in chunk:
                if inbound(j, me):
                    outgoing[owner[j]] += self._parts(requests[j], wires[j])
            arriving.append(
                self._all_to_all(
                    outgoing,
                    [
                        sum(sum(inbound(j, src)) for j in chunk if owner[j] == me)
                        for src in range(world)
                    ],
                    phase=0,
                    total=sum(sum(inbound(j, src)) for j in chunk for src in range(world)),
                    device=device,
                )
            )

        def assemble(j: int, incoming: list[Tensor], cursor: list[int]) -> list[Tensor]:
            """The whole tensors of owned request ``j``, from every rank's rows."""
            w = wires[j]
            if not w.layout.sharded or world == 1:
                # The whole tensor is here already, uncast: Norm.reads_as promises the same
                # direction either way.
                return self._parts(requests[j], w, cast=False)
            local_parts = self._parts(requests[j], w)
            rows_of: list[list[Tensor]] = [[] for _ in w.inbound]
            for src in range(world):
                if src == me:
                    for into, part in zip(rows_of, local_parts, strict=True):
                        into.append(part)
                    continue
                shape = (nrows(j, src), *w.layout.shape[1:])
                for into, dtype, size in zip(rows_of, w.inbound, inbound(j, src), strict=True):
                    at = cursor[src]
                    n = math.prod(shape) * dtype.itemsize
                    into.append(incoming[src][at : at + n].view(dtype).view(shape))
                    cursor[src] = at + size
            return [torch.cat(parts) for parts in rows_of]

        # -- phase 2, in chunks: each owner computes its first half of matrices and sends
        # their direction rows asynchronously while it computes the rest, so a rank that is
        # ahead keeps computing instead of waiting for the others.
        def returned(j: int, dst: int) -> list[int]:
            """Bytes of each part the owner of request ``j`` sends ``dst``."""
            w = wires[j]
            if owner[j] == dst:
                return []
            sizes = [_padded(nrows(j, dst) * w.row * w.direction.itemsize)]
            if w.dual is not None:
                sizes.append(8)
            sizes += [_padded(math.prod(shape) * d.itemsize) for _, shape, d in w.state]
            return sizes

        computed: dict[int, DirectionResult] = {}
        full_d: dict[int, Tensor] = {}
        new_state: dict[int, dict[str, Tensor]] = {}
        # An owner that fails (an SVD that does not converge, memory) must still take part in
        # every exchange, or the other ranks would wait forever: it sends stand-ins and a
        # failure status, and every rank raises once all exchanges are done.
        failure: Exception | None = None
        pending = []
        ok, failed = (torch.tensor([value], dtype=torch.int64, device=device) for value in (0, 1))
        for chunk, rows_arriving in zip(chunks, arriving, strict=True):
            owned = [j for j in chunk if owner[j] == me]
            incoming, cursor = rows_arriving(), [0] * world  # every rank waits for every chunk
            parts = None
            if failure is None:
                try:
                    wholes = {j: assemble(j, incoming, cursor) for j in owned}
                    parts = self._owned(requests, wires, owned, wholes)
                except Exception as e:
                    failure = e
            if parts is None:
                parts = self._stand_ins(wires, owned, device)
            computed.update(parts[0])
            full_d.update(parts[1])
            new_state.update(parts[2])
            # Each message starts with the sender's status (8 bytes): 1 if its work failed.
            status = ok if failure is None else failed
            messages: list[list[Tensor]] = [[status] if d != me else [] for d in range(world)]
            for j in owned:
                result = computed[j]
                for dst in range(world):
                    if dst == me:
                        continue
                    start, stop = self._rows(wires[j].layout, dst)
                    messages[dst].append(full_d[j][start:stop])
                    if result.dual is not None:
                        messages[dst].append(result.dual.to(torch.float64).reshape(1))
                    messages[dst] += [new_state[j][key] for key, _, _ in wires[j].state]
            pending.append(
                self._all_to_all(
                    messages,
                    [
                        (src != me) * _STATUS
                        + sum(sum(returned(j, me)) for j in chunk if owner[j] == src)
                        for src in range(world)
                    ],
                    phase=1,
                    total=world * (world - 1) * _STATUS,
                    device=device,
                )
            )
        received = [finish() for finish in pending]
        # Every other rank's status in every chunk, read in one host transfer.
        others = [src for src in range(world) if src != me]
        flags = (
            torch.stack(
                [
                    incoming[src][:_STATUS].view(torch.int64)[0]
                    for incoming in received
                    for src in others
                ]
            )
            if others
            else torch.zeros(0, dtype=torch.int64)
        )
        statuses = [0] * world
        for n, flag in enumerate(flags.tolist()):
            statuses[others[n % len(others)]] |= int(flag)
        self._raise_for(statuses, failure)
        out: dict[int, DirectionResult] = {}
        for chunk, incoming in zip(chunks, received, strict=True):
            cursor = [_STATUS] * world
            for j in chunk:
                r, w = requests[j], wires[j]
                if owner[j] == me:
                    start, stop = self._rows(w.layout, me)
                    out[j] = DirectionResult(full_d[j][start:stop], computed[j].dual)
                    if r.estimate is not None:
                        r.estimate.commit(new_state[j])
                    continue
                src = owner[j]
                shapes: list[tuple[tuple[int, ...], torch.dtype]] = [
                    ((nrows(j, me), *w.layout.shape[1:]), w.direction)
                ]
                if w.dual is not None:
                    shapes.append(((1,), torch.float64))
                shapes += [(shape, d) for _, shape, d in w.state]
                got: list[Tensor] = []
                for (shape, dtype), size in zip(shapes, returned(j, me), strict=True):
                    at = cursor[src]
                    n = math.prod(shape) * dtype.itemsize
                    got.append(incoming[src][at : at + n].view(dtype).view(shape))
                    cursor[src] = at + size
                dual = None if w.dual is None else got[1][0].to(w.dual)
                if r.estimate is not None:
                    tail = got[2:] if w.dual is not None else got[1:]
                    r.estimate.commit(
                        {key: t.clone() for (key, _, _), t in zip(w.state, tail, strict=True)}
                    )
                out[j] = DirectionResult(got[0], dual)
        return [out[j] for j in range(len(requests))]

    @staticmethod
    def _chunks(owner: Sequence[int]) -> list[list[int]]:
        """The requests in :data:`EXCHANGE_CHUNKS` chunks: each owner's first share of the
        matrices it owns, then the next (the same partition on every rank)."""
        position: dict[int, int] = {}
        count: dict[int, int] = {}
        for j, o in enumerate(owner):
            position[j] = count.get(o, 0)
            count[o] = position[j] + 1
        chunks: list[list[int]] = [[] for _ in range(EXCHANGE_CHUNKS)]
        for j, o in enumerate(owner):
            chunks[position[j] * EXCHANGE_CHUNKS // count[o]].append(j)
        return chunks

    @staticmethod
    def _owned(
        requests: Sequence[DirectionRequest],
        wires: Sequence[_Wire],
        mine: Sequence[int],
        wholes: Mapping[int, list[Tensor]],
    ) -> tuple[dict[int, DirectionResult], dict[int, Tensor], dict[int, dict[str, Tensor]]]:
        """The owner's work on its whole tensors: the results (in the norm's view), the
        directions in the parameters' layout, and the new state of owner-run estimators."""
        momenta: dict[int, Tensor] = {}
        new_state: dict[int, dict[str, Tensor]] = {}
        views = []
        for j in mine:
            r, parts, transposed = requests[j], wholes[j], wires[j].layout.transposed
            gradient = parts[1] if r.gradient is not None and r.estimate is None else None
            if r.estimate is not None:
                partner = parts[1] if r.estimate.partner is not None else None
                momenta[j], new_state[j] = r.estimate.run(parts[0], partner)
                if r.gradient is not None:
                    gradient = parts[0]  # the estimate's operand rows are the gradient's
            else:
                momenta[j] = parts[0]
            views.append(
                DirectionRequest(
                    r.key,
                    r.norm,
                    r.norm.operand(momenta[j], transposed),
                    r.batch,
                    r.dual,
                    None if gradient is None else r.norm.operand(gradient, transposed),
                )
            )
        computed = dict(zip(mine, compute(views), strict=True))
        full_d = {
            j: requests[j].norm.restore(
                computed[j].direction, momenta[j], wires[j].layout.transposed
            )
            for j in mine
        }
        return computed, full_d, new_state

    @staticmethod
    def _stand_ins(
        wires: Sequence[_Wire], mine: Sequence[int], device: torch.device
    ) -> tuple[dict[int, DirectionResult], dict[int, Tensor], dict[int, dict[str, Tensor]]]:
        """Zeros shaped like :meth:`_owned`'s results, sent when it failed (never applied)."""
        computed, full_d, new_state = {}, {}, {}
        for j in mine:
            w = wires[j]
            full_d[j] = torch.zeros(w.layout.shape, dtype=w.direction, device=device)
            dual = None if w.dual is None else torch.zeros((), dtype=w.dual, device=device)
            computed[j] = DirectionResult(full_d[j], dual)
            new_state[j] = {
                key: torch.zeros(shape, dtype=dtype, device=device) for key, shape, dtype in w.state
            }
        return computed, full_d, new_state

    def _wire(self, r: DirectionRequest) -> _Wire:
        """What request ``r`` sends each way (the same on every rank)."""
        layout = r.layout
        assert layout is not None, "sharded requests carry their layout"
        if r.estimate is not None:
            # The owner runs the estimator on the gradient's own bits.
            inbound = [r.operand.dtype]
            if r.estimate.partner is not None:
                inbound.append(r.estimate.partner.dtype)
            wire = r.operand.dtype
            state = tuple((key, shape, dtype) for key, (shape, dtype) in r.estimate.state.items())
        else:
            # The momentum dual needs the operand's own bits; a bfloat16 Newton–Schulz does not.
            wire = r.operand.dtype if r.dual == "momentum" else r.norm.reads_as(r.operand.dtype)
            inbound = [wire]
            if r.gradient is not None:
                inbound.append(r.gradient.dtype)
            state = ()
        # The owner computes on the norm's view of the whole tensor, in the wire dtype.
        ndim = len(r.norm.operand_shape(layout.shape, layout.transposed))
        direction, dual = self._dtypes_of(r, wire, ndim)
        return _Wire(layout, math.prod(layout.shape[1:]), tuple(inbound), direction, dual, state)

    @staticmethod
    def _parts(r: DirectionRequest, w: _Wire, cast: bool = True) -> list[Tensor]:
        """This rank's row-shaped parts of request ``r``, in ``w.inbound``'s order (the operand
        cast to its wire dtype unless ``cast`` is false)."""
        parts = [r.operand.to(w.inbound[0]) if cast else r.operand]
        if r.estimate is not None:
            if r.estimate.partner is not None:
                parts.append(r.estimate.partner)
        elif r.gradient is not None:
            parts.append(r.gradient)
        return parts

    def _all_to_all(
        self,
        outgoing: list[list[Tensor]],
        incoming_sizes: list[int],
        phase: int,
        total: int,
        device: torch.device,
    ) -> Callable[[], list[Tensor]]:
        """One asynchronous ``all_to_all_single`` of bytes, ``outgoing[dst]`` to each rank;
        returns a function that waits for it and returns what came from each rank. Skipped when
        no rank sends anything (every rank knows ``total``)."""
        packed = [_pack(parts) for parts in outgoing]
        sizes = [sum(t.numel() for t in parts) for parts in packed]
        self.last_phase_bytes[phase] += sum(sizes)
        self.last_bytes += sum(sizes)
        empty = [torch.empty(0, dtype=torch.uint8, device=device) for _ in range(self.world)]
        if total == 0:
            return lambda: empty
        send = torch.cat([t for parts in packed for t in parts]) if any(sizes) else empty[0]
        recv = torch.empty(sum(incoming_sizes), dtype=torch.uint8, device=device)
        work = dist.all_to_all_single(
            recv, send, incoming_sizes, sizes, group=self._group, async_op=True
        )
        self.last_collectives += 1

        def finish() -> list[Tensor]:
            if work is not None:
                work.wait()
            return list(torch.split(recv, incoming_sizes))

        return finish


def _named(optimizer: _Optimizer) -> Iterator[tuple[str, Tensor, dict[str, Any]]]:
    for group in optimizer.param_groups:
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            yield (str(names[i]) if names else f"params[{i}]"), p, group


def layout_error(mode: str, params: Sequence[tuple[str, Tensor, Mapping[str, Any]]]) -> str | None:
    """Why ``params`` (name, tensor, group) cannot run under ``mode``, or ``None``.

    DTensor parameters need the sharded mode, on a 1-D mesh, placed ``Shard(0)`` or
    ``Replicate()``; the sharded mode needs every parameter a DTensor of one mesh, and an
    estimator whose state is elementwise.
    """
    sharded = [(n, p) for n, p, _ in params if is_dtensor(p)]
    if not sharded:
        if mode == "sharded":
            return (
                "distributed='sharded' needs DTensor parameters (FSDP2's fully_shard); these are "
                "plain tensors (use 'replicated' for DDP, 'local' for one process)"
            )
        return None
    name, first = sharded[0]
    if mode not in ("auto", "sharded"):
        return (
            f"Parameter {name!r} is a DTensor (FSDP2 / fully_shard), which needs "
            f"distributed='sharded' (or 'auto'), not {mode!r}: running the LMO on local shards "
            "would be a different algorithm"
        )
    plain = [n for n, p, _ in params if not is_dtensor(p)]
    if plain:
        return (
            f"Parameter {plain[0]!r} is a plain tensor while {name!r} is a DTensor: the sharded "
            "mode needs every parameter sharded (apply fully_shard to the root module too)"
        )
    mesh = cast(DTensor, first).device_mesh
    for n, p, _ in params:
        d = cast(DTensor, p)
        if d.device_mesh.ndim != 1:
            return (
                f"Parameter {n!r} is a DTensor on a {d.device_mesh.ndim}-D mesh: the sharded "
                "mode supports 1-D meshes (one FSDP2 dimension) only"
            )
        if d.device_mesh != mesh:
            return f"Parameter {n!r} is on another device mesh than {name!r}; use one mesh"
        if tuple(d.placements) not in ((Shard(0),), (Replicate(),)):
            return (
                f"Parameter {n!r} has placements {tuple(d.placements)}; the sharded mode "
                "supports Shard(0) (fully_shard's default) and Replicate() only"
            )
    return None


def executor(
    optimizer: _Optimizer,
    mode: str,
    group: ProcessGroup | None,
    resolve_norm: Callable[[Mapping[str, Any], Tensor], Norm],
) -> LocalExecutor:
    """The executor of ``mode`` for ``optimizer`` (see the module docstring)."""
    check_mode(mode)
    if group is not None and not isinstance(group, ProcessGroup):
        raise ValueError(f"process_group must be a torch.distributed ProcessGroup, got {group!r}")
    params = list(_named(optimizer))
    error = layout_error(mode, params)
    if error is not None:
        raise ValueError(error)
    sharded = bool(params) and is_dtensor(params[0][1])
    if mode == "local" or (mode == "auto" and not sharded):
        return LocalExecutor()
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            f"distributed={mode!r} needs an initialised default process group "
            "(torch.distributed.init_process_group) or a process_group"
        )
    if not sharded:
        return ReplicatedExecutor(optimizer, group, resolve_norm)
    mesh_group = cast(DTensor, params[0][1]).device_mesh.get_group()
    if group is not None and dist.get_process_group_ranks(group) != dist.get_process_group_ranks(
        mesh_group
    ):
        raise ValueError(
            "process_group holds other ranks than the parameters' device mesh "
            f"({dist.get_process_group_ranks(group)} vs "
            f"{dist.get_process_group_ranks(mesh_group)}); leave it unset under FSDP2"
        )
    return ShardedExecutor(optimizer, mesh_group, resolve_norm)
