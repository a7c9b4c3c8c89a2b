"""The wire: what the distributed modes send, packed as bytes, with each rank's status.

Both transports (the replicated mode's all-gathers, the sharded mode's all-to-alls) send flat
buffers; a part of any dtype is padded to 8 bytes so it can be viewed back as its dtype where it
lands. :func:`sharded_bytes` is the sharded mode's byte formula, which the tests check against
the collectives the step issues.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from gluon_optim.directions import ShardLayout
from gluon_optim.distributed.tensors import rows

__all__ = ["EXCHANGE_CHUNKS", "sharded_bytes"]


def all_gather_single() -> Callable[..., Any]:
    """torch 2.13 renamed ``all_gather_into_tensor`` to ``all_gather_single``; older torch has
    only the first (looked up at call time, so a wrapper installed on either is honoured)."""
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def pack(parts: Sequence[Tensor]) -> list[Tensor]:
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
STATUS = 8
#: Each sharded phase is this many asynchronous all-to-alls, one per share of every owner's
#: matrices: an owner computes its first matrices while the rows of the others arrive, and
#: sends their directions while it computes the others.
EXCHANGE_CHUNKS = 2


def padded(nbytes: int) -> int:
    return nbytes + (-nbytes % 8)


@dataclass(frozen=True)
class Wire:
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
                    padded(c * per_row * out_bytes) for s, c in enumerate(counts) if s != r
                )
            else:
                sent[r] += padded(counts[r] * per_row * in_bytes)
    # Every rank also sends every other rank an 8-byte status in each message of phase 2.
    return [b + STATUS * (world - 1) * EXCHANGE_CHUNKS for b in sent]
