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
* ``"auto"`` (default): ``"local"`` for plain tensors. Parameters that are DTensors (FSDP2's
  ``fully_shard``) raise: the sharded owner mode they need is not implemented yet, and Newton–
  Schulz on a local shard would be a different algorithm.

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from gluon_optim.directions import DirectionRequest, DirectionResult, LocalExecutor, compute
from gluon_optim.norms import POLAR_OPTIONS, Norm, PolarNorm

__all__ = [
    "MODES",
    "ReplicatedExecutor",
    "assign_owners",
    "check_mode",
    "executor",
    "lmo_cost",
]

MODES = ("auto", "replicated", "local")


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


def assign_owners(costs: Sequence[int], world: int) -> list[int]:
    """Longest-processing-time owners: the costliest item first, to the least loaded rank.

    Ties (equal cost) go in item order and to the lowest rank, so the table depends only on the
    costs and ``world``.
    """
    loads = [0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
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


def _lmo_params(
    optimizer: _Optimizer,
) -> Iterator[tuple[tuple[int, int], str, Tensor, dict[str, Any]]]:
    for gi, group in enumerate(optimizer.param_groups):
        if group["algorithm"] != "lmo":
            continue
        names = group.get("param_names")
        for pi, p in enumerate(group["params"]):
            yield (gi, pi), str(names[pi]) if names else f"params[{pi}]", p, group


def _is_dtensor(p: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - every supported torch has it
        return False
    return isinstance(p, DTensor)


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
            (tuple((id(p), p.shape, p.dtype) for p in g["params"]), *(g[k] for k in _NORM_KEYS))
            for g in self._optimizer.param_groups
        )
        if self._plan is not None and self._quick == quick:
            return self._plan
        entries = []
        for key, name, p, group in _lmo_params(self._optimizer):
            norm = self._resolve_norm(group, p)
            shape = norm.operand_shape(p.shape, group["transposed"])
            entries.append((key, name, shape, str(p.dtype), norm, group["ns_steps"]))
        signature = tuple(
            (k, name, shape, dtype, n.describe()) for k, name, shape, dtype, n, _ in entries
        )
        if self._plan is not None and self._plan.signature == signature:
            self._quick = quick  # the change did not matter: skip this work from now on
            return self._plan
        self._check_same_everywhere(signature)
        costs = {e[0]: lmo_cost(e[4], e[2], e[5]) for e in entries}
        keys = list(costs)
        owners = dict(zip(keys, assign_owners([costs[k] for k in keys], self.world), strict=True))
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
                f"distributed='replicated': rank {self.rank} and rank {rank} built different "
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
    def agree(self, has_grad: list[bool], finite: list[Tensor | None]) -> list[bool]:
        """Per parameter, whether its gradient is finite on every rank. Raises (having changed
        nothing) when a parameter has a gradient on some ranks only."""
        device = next((f.device for f in finite if f is not None), torch.device("cpu"))
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
            raise RuntimeError(
                f"distributed='replicated': parameter(s) at position(s) {split} of the "
                f"optimizer have a gradient on {grads[split[0]]} of {self.world} ranks; every "
                "rank must compute the same gradients (a parameter unused on one rank only "
                "needs find_unused_parameters in DDP, or a zero gradient). Nothing was changed."
            )
        return [c == self.world for c in oks]

    # -- the directions -------------------------------------------------------------------------
    def _dtypes_of(self, r: DirectionRequest) -> tuple[torch.dtype, torch.dtype | None]:
        """The dtypes of a request's direction and dual, which non-owners need to unpack them.

        The same computation on a one-element zero operand of the same dtypes and rank gives
        them without running the real LMO.
        """
        grad_dtype = None if r.gradient is None else r.gradient.dtype
        key = (r.norm, r.operand.dtype, r.operand.ndim, r.dual, grad_dtype)
        if key not in self._dtypes:

            def zeros(dtype: torch.dtype) -> Tensor:
                return torch.zeros((1,) * r.operand.ndim, dtype=dtype)

            gradient = None if grad_dtype is None else zeros(grad_dtype)
            probe = DirectionRequest(r.key, r.norm, zeros(r.operand.dtype), False, r.dual, gradient)
            (result,) = compute([probe])
            self._dtypes[key] = (
                result.direction.dtype,
                None if result.dual is None else result.dual.dtype,
            )
        return self._dtypes[key]

    def directions(self, requests: Sequence[DirectionRequest]) -> list[DirectionResult]:
        plan = self.plan()
        owner = [plan.owners[r.key] for r in requests]
        mine = [j for j, o in enumerate(owner) if o == self.rank]
        computed = dict(zip(mine, compute([requests[j] for j in mine]), strict=True))
        kinds = [self._dtypes_of(r) for r in requests]
        dtypes = [k[0] for k in kinds]
        directions: list[Tensor | None] = [None] * len(requests)
        for dtype in sorted(set(dtypes), key=str):
            idx = [j for j in range(len(requests)) if dtypes[j] == dtype]
            for j, flat in zip(
                idx, self._share(requests, owner, computed, idx, dtype), strict=True
            ):
                directions[j] = flat.view(requests[j].operand.shape)
        duals = self._share_duals(requests, owner, computed, [k[1] for k in kinds])
        return [DirectionResult(d, duals.get(j)) for j, d in enumerate(directions) if d is not None]

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
    ) -> dict[int, Tensor]:
        """Items ``idx``, each computed by its owner, on every rank: one all-gather.

        This rank packs ``local_values(j)`` (flat, ``size_of(j)`` long) of the items it owns,
        in order, into a buffer padded to the widest rank's; every item comes back as its flat
        slice of the gathered buffers. ``last_owned[label]`` records the sizes per rank.
        """
        by_rank: list[list[int]] = [[] for _ in range(self.world)]
        for j in idx:
            by_rank[owner[j]].append(j)
        sizes = [sum(size_of(j) for j in js) for js in by_rank]
        self.last_owned[label] = sizes
        local = torch.zeros(max(sizes), dtype=dtype, device=device)
        offset = 0
        for j in by_rank[self.rank]:
            n = size_of(j)
            local[offset : offset + n] = local_values(j)
            offset += n
        gathered = self._gather(local)
        out: dict[int, Tensor] = {}
        for rank, js in enumerate(by_rank):
            offset = 0
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
    ) -> list[Tensor]:
        """The directions ``idx`` (all of ``dtype``), each from its owner, flattened."""
        out = self._exchange(
            idx,
            owner,
            lambda j: computed[j].direction.reshape(-1),
            lambda j: requests[j].operand.numel(),
            dtype,
            requests[idx[0]].operand.device,
            str(dtype).removeprefix("torch."),
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


def executor(
    optimizer: _Optimizer,
    mode: str,
    group: ProcessGroup | None,
    resolve_norm: Callable[[Mapping[str, Any], Tensor], Norm],
) -> LocalExecutor:
    """The executor of ``mode`` for ``optimizer`` (see the module docstring)."""
    check_mode(mode)
    for _, name, p, _ in _lmo_params(optimizer):
        if _is_dtensor(p):
            raise ValueError(
                f"Parameter {name!r} is a DTensor (FSDP2 / fully_shard): the sharded owner mode "
                "that keeps Gluon's algorithm on sharded parameters is not implemented yet, and "
                "running the LMO on local shards would be a different algorithm. Use DDP with "
                "distributed='replicated' for now."
            )
    if mode in ("auto", "local"):
        return LocalExecutor()
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "distributed='replicated' needs an initialised default process group "
            "(torch.distributed.init_process_group) or a process_group"
        )
    if group is not None and not isinstance(group, ProcessGroup):
        raise ValueError(f"process_group must be a torch.distributed ProcessGroup, got {group!r}")
    return ReplicatedExecutor(optimizer, group, resolve_norm)
