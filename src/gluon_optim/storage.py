"""Optimizer state stored in a narrower dtype than the step computes in (``state_dtype``).

A buffer kept in bfloat16 is read into the compute dtype, updated there and rounded back once
per step: ``M_stored <- round(f(decode(M_stored), g))``. The alternative, updating the stored
bfloat16 tensor in place, would round after every operation of the recursion (three times
for MVR-1's ``sub``, ``mul``, ``add``) and mix in the gradient at bfloat16 precision.

:class:`StoredState` is that read-update-round cycle as a view of one parameter's state, so
the estimators and AdamW run their unchanged float code on it: a read of a stored key returns a
decoded copy, writes go to the copies, and :meth:`StoredState.commit` rounds them into the
state. Keys it does not manage (the step count, the two-point buffers) pass straight through.

Rounding is to nearest even (``Tensor.to``). Stochastic rounding would make the rounding error
unbiased across steps; whether that matters here is a question for the measurements in
docs/memory.md, not a default.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, MutableMapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["STATE_DTYPES", "StoredState", "compute_dtype", "store_dtype"]

#: The values of the group setting ``state_dtype``; ``auto`` stores each buffer in its
#: parameter's dtype (no conversion, the behaviour before the setting existed).
STATE_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
}


def store_dtype(setting: str, param_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype state is stored in for ``state_dtype=setting``, or ``None`` where that is the
    parameter's own dtype (nothing to convert)."""
    dtype = STATE_DTYPES[setting]
    return None if dtype is None or dtype == param_dtype else dtype


def compute_dtype(store: torch.dtype, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype the step updates stored state in: the wider of the two. A bfloat16 buffer of
    a float32 parameter is updated in float32; a float32 buffer of a bfloat16 parameter is
    updated in float32 too (with the gradient cast up), so it keeps what bfloat16 loses."""
    return torch.promote_types(store, param_dtype)


class StoredState(MutableMapping[str, Any]):
    """One parameter's state with the buffers ``keys`` stored in ``store`` and updated in
    ``compute`` (see the module docstring).

    Until :meth:`commit`, reads of those keys return decoded copies and writes replace the
    copies, so the state itself does not change; ``commit`` rounds every copy into the state
    (in place where the stored tensor already has the store dtype and shape). From then on a
    read returns a fresh decoded copy and a write is rounded into the state at once (an
    owner-run estimator reads and writes its state after the estimator stage).
    """

    def __init__(
        self,
        state: MutableMapping[str, Any],
        keys: Iterable[str],
        store: torch.dtype,
        compute: torch.dtype,
    ) -> None:
        self._state = state
        self._keys = frozenset(keys)
        self._store = store
        self._compute = compute
        self._work: dict[str, Tensor] = {}
        self._committed = False

    def __getitem__(self, key: str) -> Any:
        if key in self._work:
            return self._work[key]
        value = self._state[key]
        if key in self._keys and isinstance(value, Tensor):
            # A copy in every case: an update must not reach the state but through commit().
            work = value.to(self._compute, copy=True)
            if not self._committed:
                self._work[key] = work
            return work
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        if key in self._keys and isinstance(value, Tensor):
            if self._committed:
                self._store_into(key, value)
            else:
                self._work[key] = value
        else:
            self._state[key] = value

    def __delitem__(self, key: str) -> None:
        found = key in self._work or key in self._state
        self._work.pop(key, None)
        self._state.pop(key, None)
        if not found:
            raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        yield from self._state
        yield from (key for key in self._work if key not in self._state)

    def __len__(self) -> int:
        return len(self._state) + sum(key not in self._state for key in self._work)

    def commit(self) -> None:
        """Round every updated copy into the state; later writes are rounded at once."""
        for key, value in self._work.items():
            self._store_into(key, value)
        self._work.clear()
        self._committed = True

    def _store_into(self, key: str, value: Tensor) -> None:
        stored = self._state.get(key)
        if (
            isinstance(stored, Tensor)
            and stored.dtype == self._store
            and stored.shape == value.shape
        ):
            stored.copy_(value)
        else:
            self._state[key] = value.to(self._store)
