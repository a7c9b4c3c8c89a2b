"""DTensor helpers of the sharded mode: local parts, rows of Shard(0), state like its parameter."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

from torch import Tensor
from torch.distributed.tensor import DTensor

__all__ = ["LocalState", "is_dtensor", "local", "rows", "shard_like"]


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
