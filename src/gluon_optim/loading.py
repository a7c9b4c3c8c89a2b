"""What ``Gluon.load_state_dict`` checks before anything changes: a saved state, refused or
accepted with its meaning.

Refused, with the key and the parameter named: a dict without ``"state"`` or
``"param_groups"``; groups that are not the optimizer's (their number, their sizes, an id listed
twice); per-parameter state with a key its group's configuration does not keep, a tensor of the
wrong shape or a non-floating dtype, a non-finite value, a step that is not a count; and a
*partial* state, one that has started but lacks a key every step of its configuration leaves.
An empty state is a fresh start. The optimizer hands over its table of algorithms (:class:`Keeps`),
so these checks know no algorithm by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from gluon_optim import distributed as _distributed
from gluon_optim.estimators import WHOLE_STATE
from gluon_optim.groups import DEFAULTS, param_name

__all__ = ["Keeps", "check_layout", "checked_state", "saved_parts"]

_local = _distributed.local


class Keeps(Protocol):
    """What these checks ask of a group's algorithm (``optimizer.Algorithm`` is one): the state
    keys it may keep (besides ``"step"``) and those every step leaves."""

    @property
    def state(self) -> Callable[[Mapping[str, Any]], tuple[str, ...]]: ...

    @property
    def kept(self) -> Callable[[Mapping[str, Any]], tuple[str, ...]]: ...


def saved_parts(state_dict: Any) -> tuple[list[Mapping[str, Any]], Mapping[Any, Any]]:
    """The saved groups and per-parameter state of ``state_dict``; raises if it is malformed.

    A dict without ``"state"`` is refused rather than read as an empty state: that would start
    every parameter afresh, silently. ``"state": {}`` says so explicitly.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            "load_state_dict: expected a dict with 'state' and 'param_groups' (what state_dict() "
            f"returns), got {type(state_dict).__name__}"
        )
    fix = {
        "state": "to load only the groups and start every parameter afresh, pass 'state': {}",
        "param_groups": "it must list the groups, as state_dict() saves them",
    }
    for key, why in fix.items():
        if key not in state_dict:
            raise ValueError(f"load_state_dict: the state dict has no {key!r}; {why}")
    saved, groups = state_dict["state"], state_dict["param_groups"]
    if not isinstance(saved, Mapping):
        raise TypeError(
            "load_state_dict: 'state' must be a dict of per-parameter states, got "
            f"{type(saved).__name__}"
        )
    if not isinstance(groups, list | tuple) or not all(isinstance(g, Mapping) for g in groups):
        raise TypeError("load_state_dict: 'param_groups' must be a list of dicts")
    return list(groups), saved


def check_layout(current: list[dict[str, Any]], saved: list[Mapping[str, Any]]) -> None:
    """Raise unless the saved groups list the optimizer's groups: as many, as large, ids once.

    torch checks the first two later, after our checks have read the state through the ids;
    an id listed twice would give one parameter's state to two of them.
    """
    if len(saved) != len(current):
        raise ValueError(
            f"load_state_dict: 'param_groups' has {len(saved)} group(s), the optimizer "
            f"{len(current)}; load a state dict saved by an optimizer with the same groups"
        )
    seen: dict[Any, int] = {}
    for index, (group, saved_group) in enumerate(zip(current, saved, strict=True)):
        ids = saved_group.get("params")
        if not isinstance(ids, list | tuple):
            raise ValueError(
                f"load_state_dict: param group {index} has no 'params' list of parameter ids, "
                f"got {ids!r}"
            )
        if len(ids) != len(group["params"]):
            raise ValueError(
                f"load_state_dict: param group {index}'s 'params' lists {len(ids)} "
                f"parameter(s), the optimizer's group holds {len(group['params'])}"
            )
        for key in ids:
            try:
                other = seen.get(key)
            except TypeError:
                raise ValueError(
                    f"load_state_dict: param group {index}'s 'params' holds {key!r}, which is "
                    "no parameter id (an int, or a name)"
                ) from None
            seen[key] = index
            if other is not None:
                raise ValueError(
                    f"load_state_dict: parameter id {key!r} is listed twice in 'param_groups' "
                    f"(param groups {other} and {index}); every id names one parameter"
                )


def checked_state(
    current: list[dict[str, Any]],
    saved_groups: list[dict[str, Any]],
    saved: Mapping[Any, Any],
    algorithms: Mapping[str, Keeps],
) -> dict[Any, Any]:
    """The saved per-parameter state, checked against the parameters it will belong to.

    Raises ``ValueError`` naming the parameter and key for a key its group's configuration does
    not declare, a tensor of the wrong shape or a non-floating dtype, a non-finite value, a
    ``step`` that is not a count, or a partial state (:func:`_missing_key`). A plain-number
    ``step`` (as PyTorch's own tests write) is turned into the tensor the step expects. Nothing
    is loaded before every entry passed. The groups' layout was checked (:func:`check_layout`).
    """
    owner: dict[Any, tuple[dict[str, Any], int, Tensor]] = {}
    for group, saved_group in zip(current, saved_groups, strict=True):
        merged = {**DEFAULTS, **saved_group}
        if not merged.get("param_names") and group.get("param_names"):
            merged["param_names"] = group["param_names"]
        for i, (key, p) in enumerate(zip(saved_group["params"], group["params"], strict=True)):
            owner[key] = (merged, i, p)
    out: dict[Any, Any] = {}
    for key, entry in saved.items():
        if key not in owner:
            raise ValueError(f"load_state_dict: state for parameter {key!r}, which no group holds")
        group, i, p = owner[key]
        where_ = f"load_state_dict: parameter {param_name(group, i)!r}"
        if not isinstance(entry, Mapping):
            raise ValueError(
                f"{where_}: its state must be a dict of state keys, got {type(entry).__name__}"
            )
        allowed = {"step", *algorithms[group["algorithm"]].state(group)}
        out[key] = {}
        for name, value in entry.items():
            if name not in allowed:
                raise ValueError(
                    f"{where_}: state key {name!r} is not kept by its group's configuration "
                    f"(keeps {sorted(allowed)})"
                )
            out[key][name] = _checked_value(where_, name, value, p, entry)
        missing = _missing_key(group, out[key], algorithms[group["algorithm"]])
        if missing is not None:
            raise ValueError(
                f"{where_}: state has no {missing!r} (it holds {sorted(entry)}), which every "
                "step of its group's configuration keeps; the next step would silently restart "
                f"{'its step count and every schedule' if missing == 'step' else 'it'}. Load the "
                "complete state, or an empty one ({}) to start this parameter afresh"
            )
    return out


def _missing_key(group: Mapping[str, Any], entry: Mapping[str, Any], keeps: Keeps) -> str | None:
    """The first key a started state lacks: ``step``, or one its algorithm keeps every step.

    An empty state has not started (a fresh parameter), and neither has one whose step count is
    0: its tensors are placeholders (:meth:`Gluon.materialize_state`) that the first step drops.
    """
    if not entry:
        return None
    if "step" not in entry:
        return "step"
    if float(_local(entry["step"])) == 0:
        return None
    kept = keeps.kept(group)
    return next((key for key in kept if key not in entry), None)


def _checked_value(where_: str, name: str, value: Any, p: Tensor, entry: Mapping[str, Any]) -> Any:
    if name == "step":
        number = value.item() if isinstance(value, Tensor) and value.numel() == 1 else value
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ValueError(f"{where_}: step must be a count, got {value!r}")
        if not (number >= 0 and float(number).is_integer()):
            raise ValueError(f"{where_}: step must be a whole number >= 0, got {number!r}")
        return value if isinstance(value, Tensor) else torch.tensor(float(number))
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise ValueError(f"{where_}: state {name!r} must be a floating-point tensor")
    expected = _state_shape(name, p, value, entry)
    if tuple(value.shape) != expected:
        shared = name in ("lowrank_u", "lowrank_v") and "lowrank_s" in entry
        why = " (the rank is the length of 'lowrank_s': the three factors share it)"
        raise ValueError(
            f"{where_}: state {name!r} has shape {tuple(value.shape)}, expected {expected}"
            + (why if shared else "")
        )
    if isinstance(value, DTensor) and (
        not isinstance(p, DTensor)
        or value.placements != p.placements
        or value.device_mesh != p.device_mesh
    ):
        theirs = "a plain tensor" if not isinstance(p, DTensor) else f"{tuple(p.placements)}"
        raise ValueError(
            f"{where_}: state {name!r} is a DTensor placed {tuple(value.placements)} on "
            f"{value.device_mesh}, but the parameter is {theirs}; load whole tensors, or "
            "DTensors laid out like the parameters (torch.distributed.checkpoint does)"
        )
    if isinstance(p, DTensor) and not isinstance(value, DTensor) and name not in WHOLE_STATE:
        # A whole tensor (a one-process or "replicated" checkpoint): keep this rank's rows.
        value = _distributed.shard_like(value, p)
    # Each rank checks its own part of a DTensor (load_state_dict agrees on the outcome).
    if not bool(torch.isfinite(_local(value)).all()):
        raise ValueError(f"{where_}: state {name!r} holds non-finite values")
    if name == "exp_avg_sq" and bool((_local(value) < 0).any()):
        raise ValueError(f"{where_}: state 'exp_avg_sq' has negative entries")
    return value


def _state_shape(name: str, p: Tensor, value: Tensor, entry: Mapping[str, Any]) -> tuple[int, ...]:
    """The shape state ``name`` must have for parameter ``p``.

    The low-rank factors ``U`` ``(m, r)``, ``S`` ``(r,)``, ``V`` ``(n, r)`` may have any rank
    ``r`` (the group's ``rank`` may have changed since they were made: the next step reads them
    and stores the new rank), but one ``r`` for all three, read from ``S``; otherwise the step
    would fail part-way through.
    """
    if name in ("lowrank_u", "lowrank_s", "lowrank_v"):
        m = p.shape[0] if p.ndim else 1
        n = p.numel() // max(m, 1)
        s = entry.get("lowrank_s")
        if isinstance(s, Tensor) and s.ndim >= 1:
            r = s.shape[0]
        else:  # no S to read r from: each factor alone (a missing S is refused by its name)
            r = value.shape[-1 if name != "lowrank_s" else 0] if value.ndim else 0
        return {"lowrank_u": (m, r), "lowrank_s": (r,), "lowrank_v": (n, r)}[name]
    return tuple(p.shape)
