"""The owner plan: the LMO units, their costs, and which rank computes each.

Every rank derives the same table from shapes and settings alone (:func:`assign_owners` on
:func:`lmo_cost`); an executor checks once that the others derived it from the same
parameters, so ranks whose param groups differ fail with a clear error instead of hanging.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from gluon_optim.norms import POLAR_OPTIONS, Norm, PolarNorm

__all__ = ["Plan", "Unit", "assign", "assign_owners", "lmo_cost", "lmo_units", "plan_key"]


class OptimizerLike(Protocol):
    param_groups: list[dict[str, Any]]


def lmo_cost(norm: Norm, shape: Sequence[int], ns_steps: int) -> int:
    """The cost model of the owner assignment: Newton–Schulz work, or the element count.

    Spectral norms cost ``steps * max(m, n) * min(m, n)^2`` multiply-adds for an ``m x n``
    operand, times the number of units of a batch of them (a blocked parameter's operand is
    ``(*units, m, n)``); every other LMO is elementwise or a reduction, ``numel``.
    """
    numel = 1
    for s in shape:
        numel *= s
    if isinstance(norm, PolarNorm) and len(shape) >= 2:
        m = shape[-2] if norm.kind == "matrix" else shape[0]
        n = shape[-1] if norm.kind == "matrix" else numel // shape[0]
        return ns_steps * max(m, n) * min(m, n) ** 2 * (numel // (m * n))
    return numel


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
class Plan:
    """The owner of every LMO parameter, by request key."""

    signature: tuple[Any, ...]
    owners: dict[tuple[int, int], int]
    costs: dict[tuple[int, int], int]


#: The group settings that decide a parameter's norm (and so its cost and direction dtype).
_NORM_KEYS = ("algorithm", "norm", "shape_rule", "transposed", "blocks", *POLAR_OPTIONS)
#: ... and those that decide what else its exchange carries (a dual norm, gradient rows, an
#: owner-run estimator with its partner and factors): ranks must agree on all of them, or the
#: message sizes they expect would differ.
_EXCHANGE_KEYS = ("radius_policy", "radius_source", "estimator", "two_point", "rank")
_PLAN_KEYS = (*_NORM_KEYS, *_EXCHANGE_KEYS)


def _lmo_params(
    optimizer: OptimizerLike,
) -> Iterator[tuple[tuple[int, int], str, Tensor, dict[str, Any]]]:
    for gi, group in enumerate(optimizer.param_groups):
        if group["algorithm"] != "lmo":
            continue
        names = group.get("param_names")
        for pi, p in enumerate(group["params"]):
            yield (gi, pi), str(names[pi]) if names else f"params[{pi}]", p, group


@dataclass(frozen=True)
class Unit:
    """One LMO unit of the plan: a parameter's operand as its norm sees it."""

    key: tuple[int, int]  # (group index, index in the group), the request's key
    name: str
    shape: tuple[int, ...]  # the operand's shape in the norm's view
    dtype: str  # the parameter's dtype and device type
    norm: Norm
    ns_steps: int
    exchange: tuple[str, ...]  # the settings that decide what else its messages carry


def plan_key(optimizer: OptimizerLike) -> tuple[Any, ...]:
    """A cheap key of everything the plan depends on: the parameters' ids, shapes and dtypes,
    and the settings that decide their norms and messages. Equal keys, equal plans."""
    return tuple(
        (tuple((id(p), p.shape, p.dtype) for p in g["params"]), *(g.get(k) for k in _PLAN_KEYS))
        for g in optimizer.param_groups
    )


def lmo_units(
    optimizer: OptimizerLike, resolve_norm: Callable[[Mapping[str, Any], Tensor], Norm]
) -> tuple[tuple[Any, ...], list[Unit]]:
    """The optimizer's LMO units, and their signature: what ranks must agree on."""
    units = []
    for key, name, p, group in _lmo_params(optimizer):
        norm = resolve_norm(group, p)
        units.append(
            Unit(
                key,
                name,
                tuple(norm.operand_shape(p.shape, group["transposed"], group["blocks"])),
                f"{p.dtype}@{p.device.type}",
                norm,
                group["ns_steps"],
                tuple(f"{k}={group.get(k)}" for k in _EXCHANGE_KEYS),
            )
        )
    signature = tuple(
        (u.key, u.name, u.shape, u.dtype, u.norm.describe(), *u.exchange) for u in units
    )
    return signature, units


def assign(signature: tuple[Any, ...], units: Sequence[Unit], world: int) -> Plan:
    """The owner of every unit: :func:`assign_owners` on :func:`lmo_cost`, ties by shape."""
    costs = {u.key: lmo_cost(u.norm, u.shape, u.ns_steps) for u in units}
    table = assign_owners([costs[u.key] for u in units], world, [u.shape for u in units])
    owners = dict(zip((u.key for u in units), table, strict=True))
    return Plan(signature, owners, costs)


def named_params(optimizer: OptimizerLike) -> Iterator[tuple[str, Tensor, dict[str, Any]]]:
    """Every parameter of ``optimizer`` with its name (``params[i]`` without ``param_names``)."""
    for group in optimizer.param_groups:
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            yield (str(names[i]) if names else f"params[{i}]"), p, group
