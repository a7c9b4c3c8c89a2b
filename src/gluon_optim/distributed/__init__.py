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

The package, by what each file decides:

* :mod:`.plan`: the LMO units of an optimizer, their costs and owners (the same on every rank);
* :mod:`.wire`: packing parts into byte buffers, the status each rank sends, the byte formula;
* :mod:`.tensors`: DTensor helpers (local parts, ``Shard(0)`` rows, state laid out like a
  parameter);
* :mod:`.replicated` and :mod:`.sharded`: one executor per layout;
* :mod:`.layouts`: the modes, which layouts each accepts, and :func:`executor`, the choice.
"""

from __future__ import annotations

from gluon_optim.distributed.layouts import MODES, check_mode, executor, layout_error
from gluon_optim.distributed.plan import assign_owners, lmo_cost
from gluon_optim.distributed.replicated import ReplicatedExecutor
from gluon_optim.distributed.sharded import ShardedExecutor
from gluon_optim.distributed.tensors import LocalState, is_dtensor, local, rows, shard_like
from gluon_optim.distributed.wire import EXCHANGE_CHUNKS, sharded_bytes

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
