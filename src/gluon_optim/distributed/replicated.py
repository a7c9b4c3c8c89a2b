"""The ``"replicated"`` direction stage (DDP): each owner computes, all-gathers share.

Parameters are plain tensors, identical on every rank. Every rank runs the elementwise stages
on every parameter; each LMO is computed by its owner (:mod:`.plan`) and one
``all_gather_into_tensor`` per direction dtype hands every rank every direction, so the result
equals one process bit for bit given the same gradients.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from gluon_optim.directions import (
    DirectionRequest,
    DirectionResult,
    LocalExecutor,
    compute,
    dual_shape,
)
from gluon_optim.distributed.plan import (
    OptimizerLike,
    Plan,
    assign,
    lmo_units,
    named_params,
    plan_key,
)
from gluon_optim.distributed.tensors import local
from gluon_optim.distributed.wire import all_gather_single
from gluon_optim.norms import Norm

__all__ = ["ReplicatedExecutor"]


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
    settles_errors = True

    def __init__(
        self,
        optimizer: OptimizerLike,
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
        self._plan: Plan | None = None
        self._quick: tuple[Any, ...] = ()
        self._dtypes: dict[tuple[Any, ...], tuple[torch.dtype, torch.dtype | None]] = {}
        self.last_bytes = 0
        self.last_agree_bytes = 0
        self.last_collectives = 0
        self.last_owned: dict[str, list[int]] = {}

    # -- the owner table --------------------------------------------------------------------
    def plan(self) -> Plan:
        """The owner table for the optimizer's current parameters, checked across ranks once.

        Rebuilt only when the parameters or the settings that decide their norms change: a
        step looks up a cheap key of those first.
        """
        quick = plan_key(self._optimizer)
        if self._plan is not None and self._quick == quick:
            return self._plan
        signature, units = lmo_units(self._optimizer, self._resolve_norm)
        if self._plan is not None and self._plan.signature == signature:
            self._quick = quick  # the change did not matter: skip this work from now on
            return self._plan
        self._check_same_everywhere(signature)
        self._plan, self._quick = assign(signature, units, self.world), quick
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
            names = [name for name, _, _ in named_params(self._optimizer)]
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
            dual = None if dual_dtype is None else torch.zeros(dual_shape(r), dtype=dual_dtype)
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
        all_gather_single()(out, local, group=self._group)
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

        # One dual per LMO unit: a blocked parameter sends one per unit.
        shapes = {j: dual_shape(requests[j]) for j in need}

        def value(j: int) -> Tensor:
            dual = computed[j].dual
            assert dual is not None
            return dual.to(torch.float64).reshape(-1)

        out = self._exchange(
            need,
            owner,
            value,
            lambda j: math.prod(shapes[j]),
            torch.float64,
            requests[need[0]].operand.device,
            "dual",
        )
        duals: dict[int, Tensor] = {}
        for j, flat in out.items():
            dtype = dtypes[j]
            assert dtype is not None
            duals[j] = flat.reshape(shapes[j]).to(dtype)
        return duals
