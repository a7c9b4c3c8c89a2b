"""The ``"sharded"`` direction stage (FSDP2): owners assemble whole tensors from all ranks' rows.

Two phases of row all-to-alls per step: each rank sends every owner its rows of the owner's
operands; each owner computes the direction of the whole tensor, exactly as one process does,
and sends every rank its rows of it (see :class:`ShardedExecutor`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from gluon_optim.blocks import is_stack
from gluon_optim.directions import DirectionRequest, DirectionResult, ShardLayout, compute
from gluon_optim.distributed.replicated import ReplicatedExecutor
from gluon_optim.distributed.tensors import rows
from gluon_optim.distributed.wire import EXCHANGE_CHUNKS, STATUS, Wire, pack, padded

__all__ = ["ShardedExecutor"]


def _units_here(r: DirectionRequest) -> bool:
    """Whether request ``r`` is a stack of experts, whose rows here are whole LMO units."""
    layout = r.layout
    return layout is not None and is_stack(layout.blocks)


def _layout_rows(layout: ShardLayout, world: int, rank: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of a request's tensor that ``rank`` holds (all of a
    ``Replicate()`` one)."""
    n = layout.shape[0] if layout.shape else 1
    return rows(n, world, rank) if layout.sharded else (0, n)


@dataclass(frozen=True)
class _Step:
    """One sharded step: the requests, what each sends each way, and their owners, all derived
    the same way on every rank, so every rank knows every message's size."""

    requests: Sequence[DirectionRequest]
    wires: list[Wire]
    owner: list[int]
    world: int
    rank: int
    device: torch.device

    def nrows(self, j: int, rank: int) -> int:
        """How many rows of request ``j``'s tensor ``rank`` holds."""
        start, stop = _layout_rows(self.wires[j].layout, self.world, rank)
        return stop - start

    def inbound(self, j: int, src: int) -> list[int]:
        """Bytes of each part ``src`` sends the owner of request ``j`` (phase 1)."""
        w = self.wires[j]
        if not w.layout.sharded or self.owner[j] == src:
            return []
        return [padded(self.nrows(j, src) * w.row * d.itemsize) for d in w.inbound]

    def returned(self, j: int, dst: int) -> list[int]:
        """Bytes of each part the owner of request ``j`` sends ``dst`` (phase 2)."""
        w = self.wires[j]
        if self.owner[j] == dst:
            return []
        sizes = [padded(self.nrows(j, dst) * w.row * w.direction.itemsize)]
        if w.dual is not None:
            sizes.append(8)
        sizes += [padded(math.prod(shape) * d.itemsize) for _, shape, d in w.state]
        return sizes


@dataclass
class _OwnerWork:
    """What this rank computed for the requests it owns (or stand-ins), and its failure."""

    computed: dict[int, DirectionResult] = field(default_factory=dict)  # in the norm's view
    full_d: dict[int, Tensor] = field(default_factory=dict)  # in the parameter's layout
    new_state: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    failure: Exception | None = None

    def add(
        self,
        parts: tuple[dict[int, DirectionResult], dict[int, Tensor], dict[int, dict[str, Tensor]]],
    ) -> None:
        self.computed.update(parts[0])
        self.full_d.update(parts[1])
        self.new_state.update(parts[2])


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
    materializes_state = True
    last_phase_bytes: list[int]

    def _rows(self, layout: ShardLayout, rank: int) -> tuple[int, int]:
        return _layout_rows(layout, self.world, rank)

    def directions(self, requests: Sequence[DirectionRequest]) -> list[DirectionResult]:
        plan = self.plan()
        self.last_phase_bytes = [0, 0]
        # Stacks of experts: this rank's rows are whole experts, computed here (see _local).
        here = [j for j, r in enumerate(requests) if _units_here(r)]
        work = _OwnerWork()
        local: dict[int, DirectionResult] = {}
        try:
            local = self._local([requests[j] for j in here], here)
        except Exception as e:  # raised on every rank after the exchanges below
            work.failure = e
        exchanged = sorted(set(range(len(requests))) - set(here))
        results = self._exchanged([requests[j] for j in exchanged], plan.owners, work)
        out = dict(zip(exchanged, results, strict=True)) | local
        return [out[j] for j in range(len(requests))]

    @staticmethod
    def _local(
        requests: Sequence[DirectionRequest], index: Sequence[int]
    ) -> dict[int, DirectionResult]:
        """The directions of stacks of experts from this rank's own rows, in those rows.

        ``Shard(0)`` splits a stack ``(E, ...)`` along its expert dim, so every rank holds
        whole experts (or none), each an LMO unit of its own: its direction and dual norm need
        nothing from another rank. The units of all such requests go through one call.
        """
        views = []
        for r in requests:
            layout = r.layout
            assert layout is not None
            view = (layout.transposed, layout.blocks)
            gradient = None if r.gradient is None else r.norm.operand(r.gradient, *view)
            views.append(
                DirectionRequest(
                    r.key, r.norm, r.norm.operand(r.operand, *view), r.batch, r.dual, gradient
                )
            )
        # A rank may hold no expert at all (torch.chunk gives 4 rows over 3 ranks as 2, 2, 0).
        full = [n for n, v in enumerate(views) if v.operand.numel()]
        results = dict(zip(full, compute([views[n] for n in full]), strict=True))
        out = {}
        for n, (j, r) in enumerate(zip(index, requests, strict=True)):
            layout = r.layout
            assert layout is not None
            if n not in results:
                units = views[n].operand.shape[:-2]
                dual = None if r.dual is None else r.operand.new_zeros(units)
                results[n] = DirectionResult(views[n].operand.clone(), dual)
            d = r.norm.restore(results[n].direction, r.operand, layout.transposed, layout.blocks)
            out[j] = DirectionResult(d, results[n].dual)
        return out

    def _exchanged(
        self,
        requests: Sequence[DirectionRequest],
        owners: Mapping[tuple[int, int], int],
        work: _OwnerWork,
    ) -> list[DirectionResult]:
        """The two phases of row exchanges for ``requests``; ``work`` may already hold this
        rank's failure, which every rank then raises after the exchanges."""
        step = _Step(
            requests,
            [self._wire(r) for r in requests],
            [owners[r.key] for r in requests],
            self.world,
            self.rank,
            requests[0].operand.device if requests else torch.device("cpu"),
        )
        chunks = self._chunks(step.owner)
        arriving = [self._send_rows(step, chunk) for chunk in chunks]
        # An owner that fails (an SVD that does not converge, memory) must still take part in
        # every exchange, or the other ranks would wait forever: it sends stand-ins and a
        # failure status, and every rank raises once all exchanges are done.
        pending = [
            self._send_directions(step, chunk, rows_arriving, work)
            for chunk, rows_arriving in zip(chunks, arriving, strict=True)
        ]
        received = [finish() for finish in pending]
        self._raise_for(self._statuses(step, received), work.failure)
        out: dict[int, DirectionResult] = {}
        for chunk, incoming in zip(chunks, received, strict=True):
            cursor = [STATUS] * self.world
            for j in chunk:
                out[j] = self._result(step, j, incoming, cursor, work)
        return [out[j] for j in range(len(requests))]

    # -- phase 1: every rank's rows of the owners' operands -----------------------------------
    def _send_rows(self, step: _Step, chunk: list[int]) -> Callable[[], list[Tensor]]:
        """Send each owner of ``chunk`` this rank's rows of its operands (asynchronously):
        an owner assembles and computes its first matrices while the rows of the others are
        still arriving."""
        me, world = self.rank, self.world
        outgoing: list[list[Tensor]] = [[] for _ in range(world)]
        for j in chunk:
            if step.inbound(j, me):
                outgoing[step.owner[j]] += self._parts(step.requests[j], step.wires[j])
        return self._all_to_all(
            outgoing,
            [
                sum(sum(step.inbound(j, src)) for j in chunk if step.owner[j] == me)
                for src in range(world)
            ],
            phase=0,
            total=sum(sum(step.inbound(j, src)) for j in chunk for src in range(world)),
            device=step.device,
        )

    def _assemble(
        self, step: _Step, j: int, incoming: list[Tensor], cursor: list[int]
    ) -> list[Tensor]:
        """The whole tensors of owned request ``j``, from every rank's rows."""
        w, me = step.wires[j], self.rank
        if not w.layout.sharded or self.world == 1:
            # The whole tensor is here already, uncast: Norm.reads_as promises the same
            # direction either way.
            return self._parts(step.requests[j], w, cast=False)
        local_parts = self._parts(step.requests[j], w)
        rows_of: list[list[Tensor]] = [[] for _ in w.inbound]
        for src in range(self.world):
            if src == me:
                for into, part in zip(rows_of, local_parts, strict=True):
                    into.append(part)
                continue
            shape = (step.nrows(j, src), *w.layout.shape[1:])
            for into, dtype, size in zip(rows_of, w.inbound, step.inbound(j, src), strict=True):
                at = cursor[src]
                n = math.prod(shape) * dtype.itemsize
                into.append(incoming[src][at : at + n].view(dtype).view(shape))
                cursor[src] = at + size
        return [torch.cat(parts) for parts in rows_of]

    # -- phase 2, in chunks: each owner computes its first half of matrices and sends their
    # direction rows asynchronously while it computes the rest, so a rank that is ahead keeps
    # computing instead of waiting for the others.
    def _send_directions(
        self,
        step: _Step,
        chunk: list[int],
        rows_arriving: Callable[[], list[Tensor]],
        work: _OwnerWork,
    ) -> Callable[[], list[Tensor]]:
        """Compute the owned requests of ``chunk`` (or stand-ins, once this rank failed) and
        send every rank its rows of them, each message led by this rank's status."""
        me, world = self.rank, self.world
        owned = [j for j in chunk if step.owner[j] == me]
        incoming, cursor = rows_arriving(), [0] * world  # every rank waits for every chunk
        parts = None
        if work.failure is None:
            try:
                wholes = {j: self._assemble(step, j, incoming, cursor) for j in owned}
                parts = self._owned(step.requests, step.wires, owned, wholes)
            except Exception as e:
                work.failure = e
        if parts is None:
            parts = self._stand_ins(step.wires, owned, step.device)
        work.add(parts)
        # Each message starts with the sender's status (8 bytes): 1 if its work failed.
        flag = 0 if work.failure is None else 1
        status = torch.tensor([flag], dtype=torch.int64, device=step.device)
        messages: list[list[Tensor]] = [[status] if d != me else [] for d in range(world)]
        for j in owned:
            result = work.computed[j]
            for dst in range(world):
                if dst == me:
                    continue
                start, stop = self._rows(step.wires[j].layout, dst)
                messages[dst].append(work.full_d[j][start:stop])
                if result.dual is not None:
                    messages[dst].append(result.dual.to(torch.float64).reshape(1))
                messages[dst] += [work.new_state[j][key] for key, _, _ in step.wires[j].state]
        return self._all_to_all(
            messages,
            [
                (src != me) * STATUS
                + sum(sum(step.returned(j, me)) for j in chunk if step.owner[j] == src)
                for src in range(world)
            ],
            phase=1,
            total=world * (world - 1) * STATUS,
            device=step.device,
        )

    def _statuses(self, step: _Step, received: list[list[Tensor]]) -> list[int]:
        """Every rank's status over all chunks (1: it failed), read in one host transfer."""
        others = [src for src in range(self.world) if src != self.rank]
        if not others:
            return [0] * self.world
        flags = torch.stack(
            [incoming[src][:STATUS].view(torch.int64)[0] for incoming in received for src in others]
        )
        statuses = [0] * self.world
        for n, flag in enumerate(flags.tolist()):
            statuses[others[n % len(others)]] |= int(flag)
        return statuses

    def _result(
        self, step: _Step, j: int, incoming: list[Tensor], cursor: list[int], work: _OwnerWork
    ) -> DirectionResult:
        """This rank's rows of request ``j``'s direction (and its dual), from its owner; an
        owner-run estimator's new state is committed here, after every check passed."""
        r, w, me = step.requests[j], step.wires[j], self.rank
        if step.owner[j] == me:
            start, stop = self._rows(w.layout, me)
            if r.estimate is not None:
                r.estimate.commit(work.new_state[j])
            return DirectionResult(work.full_d[j][start:stop], work.computed[j].dual)
        src = step.owner[j]
        shapes: list[tuple[tuple[int, ...], torch.dtype]] = [
            ((step.nrows(j, me), *w.layout.shape[1:]), w.direction)
        ]
        if w.dual is not None:
            shapes.append(((1,), torch.float64))
        shapes += [(shape, d) for _, shape, d in w.state]
        got: list[Tensor] = []
        for (shape, dtype), size in zip(shapes, step.returned(j, me), strict=True):
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
        return DirectionResult(got[0], dual)

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
        wires: Sequence[Wire],
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
        wires: Sequence[Wire], mine: Sequence[int], device: torch.device
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

    def _wire(self, r: DirectionRequest) -> Wire:
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
        return Wire(layout, math.prod(layout.shape[1:]), tuple(inbound), direction, dual, state)

    @staticmethod
    def _parts(r: DirectionRequest, w: Wire, cast: bool = True) -> list[Tensor]:
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
        packed = [pack(parts) for parts in outgoing]
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
