"""The one optimizer: layer-wise LMO steps (Gluon), with AdamW groups for mixed presets.

Every preset in this package (Muon, Scion, unconstrained Scion, Gluon with any norm table,
Gluon-MVR, LiMuon) is a list of parameter groups handed to :class:`Gluon`; there is no other
``step()``. The step is a fixed sequence of stages (see :class:`Gluon`); what varies between
groups is looked up in tables: :data:`ALGORITHMS` here, the estimators of
:mod:`gluon_optim.estimators`, the radius policies of :mod:`gluon_optim.radius` and the norms of
:mod:`gluon_optim.norms`. The settings are declared in :mod:`gluon_optim.groups`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Unpack

import torch
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer
from torch.optim.adam import adam as _torch_adam

from gluon_optim import blocks as _blocks
from gluon_optim import distributed as _distributed
from gluon_optim import groups as _groups
from gluon_optim import loading as _loading
from gluon_optim import norms as _norms
from gluon_optim.directions import DirectionRequest, LocalExecutor, OwnerEstimate, ShardLayout
from gluon_optim.estimators import ESTIMATORS, WHOLE_STATE, Estimator, EstimatorStep
from gluon_optim.groups import DEFAULTS, GroupOptions, where
from gluon_optim.groups import param_name as _name
from gluon_optim.radius import POLICIES, RadiusInput
from gluon_optim.storage import StoredState, compute_dtype, store_dtype
from gluon_optim.two_point import (
    TWO_POINT_KEYS,
    TwoPoint,
    Work,
    is_exact,
    kept_keys,
    needs_partner,
    state_keys,
)

__all__ = ["ALGORITHMS", "DEFAULTS", "Algorithm", "Gluon", "describe", "resolve_norm"]


# -- norms of a group -------------------------------------------------------------------------
_POLAR_OPTIONS = _norms.POLAR_OPTIONS


@lru_cache(maxsize=256)
def _build_norm(name: str, shape_rule: str, polar: tuple[Any, ...]) -> _norms.Norm:
    cls = _norms.NORMS[name]
    if not issubclass(cls, _norms.PolarNorm):
        return _norms.get(name)
    opts: dict[str, object] = dict(zip(_POLAR_OPTIONS.values(), polar, strict=True))
    if cls is _norms.Spectral:
        opts["shape_rule"] = shape_rule
    return _norms.get(name, **opts)


def resolve_norm(group: Mapping[str, Any], p: Tensor) -> _norms.Norm:
    """The :class:`~gluon_optim.norms.Norm` a group applies to parameter ``p``.

    ``norm="auto"`` picks by dimension as Scion's ``Auto``: ``bias_rms`` for 0-/1-D,
    ``spectral`` for 2-D and ``spectral_conv`` for 3-D and more, except that a stack of
    experts (``blocks`` naming ``experts``) is a stack of matrices: ``spectral``.
    """
    name = group["norm"]
    if name == "auto":
        stack = p.ndim > 2 and _blocks.is_stack(group["blocks"])
        name = (
            "bias_rms" if p.ndim <= 1 else "spectral" if p.ndim == 2 or stack else "spectral_conv"
        )
    return _build_norm(name, group["shape_rule"], tuple(group[k] for k in _POLAR_OPTIONS))


# -- check-stage helpers ------------------------------------------------------------------------
def _all_finite(t: Tensor) -> Tensor:
    """A device-side boolean: whether every entry of ``t`` is finite (and not too large).

    ``aminmax`` propagates NaN and shows an infinity in the minimum or the maximum, so the two
    extrema are finite exactly when every entry is. It is one fused reduction without a
    temporary, about 20x faster on CPU than ``isfinite(t).all()`` (docs/performance.md).

    The same two extrema also catch entries above ``1e18`` (float32, bfloat16, float64): the
    Frobenius norm of such a gradient overflows inside Newton–Schulz, which then returns a zero
    step, silently. They count as non-finite. (float16 gradients are not held to it: their own
    range ends at 65504.)
    """
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    ends = torch.stack(torch.aminmax(t))
    ok = torch.isfinite(ends).all()
    if t.dtype != torch.float16:
        ok = ok & (ends.abs() <= _LARGEST).all()
    return ok


#: The largest gradient entry a step accepts (see :func:`_all_finite`).
_LARGEST = 1e18


def _matrix_error(group: Mapping[str, Any], p: Tensor) -> str | None:
    """Why ``p`` cannot take the group's estimator (matrix-only estimators need 2-D)."""
    if group["algorithm"] == "lmo" and ESTIMATORS[group["estimator"]].matrix_only and p.ndim < 2:
        return (
            f"estimator={group['estimator']!r} needs a matrix (2-D, or a conv kernel, flattened "
            f"to (C_out, C_in*k*k)), got shape {tuple(p.shape)}; give vectors their own group "
            "with another estimator (e.g. 'mvr1')"
        )
    return None


def _check_shapes(group: Mapping[str, Any], index: int | None) -> None:
    """Raise ``ValueError`` if a parameter cannot be handled by the group's norm."""
    loc = where(group, index)
    for i, p in enumerate(group["params"]):
        name = _name(group, i)
        if torch.is_complex(p):
            raise ValueError(f"Parameter {name!r}{loc} is complex; gluon-optim is real-only")
        if not p.is_floating_point():
            raise ValueError(f"Parameter {name!r}{loc} has dtype {p.dtype}; need floating point")
        if group["algorithm"] != "lmo":
            continue
        err = _matrix_error(group, p)
        if err is not None:
            raise ValueError(f"Parameter {name!r}{loc}: {err}")
        norm = resolve_norm(group, p)
        if group["transposed"] and not (norm.kind == "matrix" and p.ndim >= 2):
            raise ValueError(
                f"transposed=True needs a matrix norm and a parameter of 2 or more dims; "
                f"parameter {name!r} "
                f"has shape {tuple(p.shape)} and norm {norm.name!r}{loc}"
            )
        err = _blocks_error(group, p, norm)
        if err is None:
            view = norm.operand_shape(p.shape, group["transposed"], group["blocks"])
            err = norm.shape_error(view)
        if err is not None:
            raise ValueError(f"Parameter {name!r}{loc}: {err}")


def _blocks_error(group: Mapping[str, Any], p: Tensor, norm: _norms.Norm) -> str | None:
    """Why ``p`` cannot be split into the group's ``blocks``, or ``None``."""
    text = group["blocks"]
    if text == _blocks.WHOLE:
        return None
    err = _blocks.parse(text).error(tuple(p.shape), group["transposed"])
    if err is not None:
        return err
    if norm.kind != "matrix":
        return (
            f"blocks={text!r} needs a matrix norm (the units are matrices); norm {norm.name!r} "
            "reads the parameter otherwise"
        )
    if ESTIMATORS[group["estimator"]].whole_state is not None:
        return (
            f"blocks={text!r} with estimator={group['estimator']!r}: its state is one "
            "factorisation of the whole parameter, not one per unit; use an elementwise "
            "estimator for this group (go.limuon(..., low_rank=False): full-rank STORM)"
        )
    return None


_local = _distributed.local


def _conform(state: MutableMapping[str, Any], keys: Iterable[str]) -> None:
    """Keep only the state keys the parameter's current configuration declares.

    A group whose estimator or two-point mode changed mid-run starts the new one from its own
    first step instead of reading buffers with another meaning; a key both share (the momentum
    buffer) carries over.
    """
    allowed = {"step", *keys}
    for key in [key for key in state if key not in allowed]:
        del state[key]


def _begin_step(state: MutableMapping[str, Any]) -> int:
    """Advance the parameter's step counter; return this step's 0-based index ``k``.

    A parameter whose count is 0 has not started: any other key it holds is a placeholder made
    up front (:meth:`Gluon.materialize_state`), dropped here so its first step starts as if
    the state were empty.
    """
    if "step" not in state:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        k = 0
    else:
        k = int(state["step"].item())  # a CPU scalar: no device synchronisation
        if k == 0:
            for key in [key for key in state if key != "step"]:
                del state[key]
    state["step"] += 1
    return k


# -- the algorithms -------------------------------------------------------------------------------
_Items = list[tuple[Tensor, Tensor]]  # a group's (parameter, gradient) pairs
_AtPrevious = Mapping[int, Tensor]  # g_k(X^{k-1}) by id(p)


@dataclass
class _Pending:
    """An LMO parameter between the estimator stage and the apply stage."""

    key: tuple[int, int]
    p: Tensor
    g: Tensor
    group: dict[str, Any]
    k: int
    norm: _norms.Norm
    operand: Tensor
    batch: bool  # the group's foreach, resolved once for all its parameters
    shape: tuple[int, ...]  # the whole parameter's (p, g and operand may be one rank's rows)
    layout: ShardLayout | None  # set for DTensor parameters: operand is then parameter-shaped
    estimate: OwnerEstimate | None = None  # an estimator the owner runs (sharded low-rank)
    direction: Tensor | None = field(default=None)
    dual: Tensor | None = field(default=None)

    def request(self) -> DirectionRequest:
        """What the direction stage computes for this parameter."""
        group = self.group
        dual = POLICIES[group["radius_policy"]].dual(group)
        gradient = None
        if dual == "gradient":
            gradient = (
                self.g
                if self.layout
                else self.norm.operand(self.g, group["transposed"], group["blocks"])
            )
        return DirectionRequest(
            self.key,
            self.norm,
            self.operand,
            self.batch,
            dual,
            gradient,
            self.layout,
            self.estimate,
        )


@dataclass(frozen=True)
class Algorithm:
    """What a group does with its parameters (the group key ``algorithm``).

    ``update(optimizer, index, group, items, at_previous)`` runs the algorithm's stages up to the
    direction stage and returns the parameters that still need a direction (AdamW needs none
    and returns ``[]``). ``state`` lists the per-parameter state keys it may keep, given the
    group (besides ``"step"``); ``kept`` those every step leaves, which a loaded state that
    has started must hold (:meth:`Gluon.load_state_dict`); ``stored`` those ``state_dtype``
    covers (every key but the two-point buffers). An algorithm with
    ``directions=False`` takes its whole step in ``update``, which the step calls only after
    every direction of the step has been computed: a direction that fails (a distributed
    owner, a compiler) then leaves those groups' parameters and state as they were.
    """

    name: str
    update: Callable[[Gluon, int, dict[str, Any], _Items, _AtPrevious], list[_Pending]]
    state: Callable[[Mapping[str, Any]], tuple[str, ...]]
    kept: Callable[[Mapping[str, Any]], tuple[str, ...]]
    stored: Callable[[Mapping[str, Any]], tuple[str, ...]]
    directions: bool = True


def _lmo_estimate(
    opt: Gluon, index: int, group: dict[str, Any], items: _Items, at_previous: _AtPrevious
) -> list[_Pending]:
    """The estimator stage of one LMO group: ``M`` for every parameter with a gradient."""
    estimator = ESTIMATORS[group["estimator"]]
    schedule = POLICIES[group["radius_policy"]].momentum
    scheduled = schedule is not None and estimator.follows_schedule
    keys = _lmo_state(group)
    position = {id(q): j for j, q in enumerate(group["params"])}
    batch = _use_foreach(group, items)
    steps: list[EstimatorStep] = []
    stored: list[StoredState] = []
    for p, g in items:
        state: MutableMapping[str, Any] = opt.state_of(p)
        _conform(state, keys)
        k = _begin_step(state)
        beta = schedule(k) if schedule is not None and scheduled else group["momentum"]
        g_prev = (
            TwoPoint.partner(state, group, at_previous.get(id(p))) if estimator.two_point else None
        )
        g, g_prev = _local(g), None if g_prev is None else _local(g_prev)
        store = store_dtype(group["state_dtype"], p.dtype)
        if store is not None:
            # The estimator updates decoded copies; they are rounded into the state below.
            compute = compute_dtype(store, p.dtype)
            state = StoredState(state, _lmo_stored(group), store, compute)
            stored.append(state)
            g, g_prev = g.to(compute), None if g_prev is None else g_prev.to(compute)
        steps.append(
            EstimatorStep(
                _local(p),
                g,
                g if g_prev is None else g_prev,
                state,
                k,
                position[id(p)],
                beta,
                scheduled,
                group,
            )
        )
    # A distributed executor runs an estimator whose state is not elementwise on the owner,
    # once (its operand is then the gradient, or this rank's rows of it under FSDP2).
    on_owner = estimator.whole_state is not None and opt.executor.owner_estimates
    estimates: list[OwnerEstimate | None] = [None] * len(steps)
    if on_owner:
        momenta = [s.g for s in steps]
        # With two_point="approx", g_prev is the state's previous gradient, which the protocol
        # overwrites below, before the owner reads it: that one is copied.
        copy = group["two_point"] == "approx"
        estimates = [
            _owner_estimate(
                estimator,
                s,
                p,
                None if s.g_prev is s.g else s.g_prev.clone() if copy else s.g_prev,
            )
            for s, (p, _) in zip(steps, items, strict=True)
        ]
    elif estimator.advance_many is not None and not scheduled and batch:
        momenta = estimator.advance_many(steps, group["momentum"])
    else:
        momenta = [estimator.update(s) for s in steps]
    if estimator.two_point:
        for s in steps:
            TwoPoint.remember(s.state, s.p, s.g, group)
    for view in stored:
        view.commit()
    out = []
    for (p, _), s, m, estimate in zip(items, steps, momenta, estimates, strict=True):
        norm = resolve_norm(group, p)
        shape = tuple(p.shape)
        if isinstance(p, DTensor) or estimate is not None:
            # The owner rank builds the norm's view of the whole tensor (gluon_optim.distributed).
            sharded = isinstance(p, DTensor) and p.placements[0].is_shard()
            layout = ShardLayout(shape, group["transposed"], sharded, group["blocks"])
            operand = m
        else:
            layout, operand = None, norm.operand(m, group["transposed"], group["blocks"])
        key = (index, s.index)
        out.append(
            _Pending(key, s.p, s.g, group, s.k, norm, operand, batch, shape, layout, estimate)
        )
    return out


def _whole_state_shapes(
    estimator: Estimator, group: Mapping[str, Any], p: Tensor
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The shapes and dtype of an estimator's whole state for ``p`` (``Estimator.whole_state``)."""
    assert estimator.whole_state is not None
    return {key: (shape, p.dtype) for key, shape in estimator.whole_state(p.shape, group).items()}


def _owner_estimate(
    estimator: Estimator, s: EstimatorStep, p: Tensor, partner: Tensor | None
) -> OwnerEstimate:
    """The estimator step ``s`` as the owner runs it on whole tensors (see ``OwnerEstimate``).

    The state it reads and writes (LiMuon's factors) is whole and the same on every rank, so
    the owner reads its own copy; the step number, position and ``beta`` are this rank's, the
    same everywhere.
    """
    like = torch.empty(p.shape, dtype=p.dtype, device="meta")  # only its shape and dtype

    def run(g: Tensor, g_prev: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        scratch = {key: s.state[key] for key in estimator.state if key in s.state}
        whole = EstimatorStep(
            like,
            g,
            g if g_prev is None else g_prev,
            scratch,
            s.k,
            s.index,
            s.beta,
            s.scheduled,
            s.group,
        )
        momentum = estimator.update(whole)
        return momentum, {key: scratch[key] for key in estimator.state}

    def commit(new: dict[str, Tensor]) -> None:
        for key, value in new.items():
            s.state[key] = value

    return OwnerEstimate(partner, run, _whole_state_shapes(estimator, s.group, p), commit)


def _use_foreach(group: Mapping[str, Any], items: list[tuple[Tensor, Tensor]]) -> bool:
    """The ``foreach`` setting resolved: ``None`` means on when every parameter is on a GPU."""
    if group["foreach"] is None:
        return all(p.is_cuda for p, _ in items)
    return bool(group["foreach"])


def _adamw(
    opt: Gluon, index: int, group: dict[str, Any], items: _Items, _unused: _AtPrevious
) -> list[_Pending]:
    """torch.optim.AdamW's own update (``torch.optim.adam.adam`` with decoupled decay).

    Calling torch's functional update keeps these groups bit-identical to torch.optim.AdamW,
    including a tensor ``lr`` (which torch reads to the host). Multi-tensor kernels follow the
    ``foreach`` setting, except with a tensor lr, which torch's foreach path does not take.
    """
    states: list[MutableMapping[str, Any]] = []
    grads = []
    for p, g in items:
        state: MutableMapping[str, Any] = opt.state_of(p)
        _conform(state, _ADAMW_STATE)
        local_p, grad = _local(p), _local(g)
        store = store_dtype(group["state_dtype"], p.dtype)
        if "exp_avg" not in state or "exp_avg_sq" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            for key in _ADAMW_STATE:
                state[key] = torch.zeros_like(
                    local_p, dtype=store, memory_format=torch.preserve_format
                )
        if store is not None:
            # torch's update runs on decoded copies, rounded into the state after it.
            compute = compute_dtype(store, p.dtype)
            state = StoredState(state, _ADAMW_STATE, store, compute)
            grad = grad.to(compute)
        states.append(state)
        grads.append(grad)
    beta1, beta2 = group["betas"]
    lr = group["lr"]
    _torch_adam(
        [_local(p) for p, _ in items],
        grads,
        [s["exp_avg"] for s in states],
        [s["exp_avg_sq"] for s in states],
        [],
        [s["step"] for s in states],
        foreach=_use_foreach(group, items) and not isinstance(lr, Tensor),
        decoupled_weight_decay=True,
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        maximize=False,
    )
    for state in states:
        if isinstance(state, StoredState):
            state.commit()
    return []


#: AdamW's per-parameter moments (torch.optim.AdamW's own state names).
_ADAMW_STATE = ("exp_avg", "exp_avg_sq")


def _lmo_state(group: Mapping[str, Any]) -> tuple[str, ...]:
    return (*ESTIMATORS[group["estimator"]].state, *state_keys(group))


def _adamw_keys(group: Mapping[str, Any]) -> tuple[str, ...]:
    return _ADAMW_STATE


def _lmo_stored(group: Mapping[str, Any]) -> tuple[str, ...]:
    # The estimator's buffers; the two-point buffers keep the parameter's dtype (storage.py).
    return ESTIMATORS[group["estimator"]].state


def _lmo_kept(group: Mapping[str, Any]) -> tuple[str, ...]:
    estimator = ESTIMATORS[group["estimator"]]
    # As the estimator stage decides it (_lmo_estimate): a schedule's beta keeps a buffer.
    scheduled = POLICIES[group["radius_policy"]].momentum is not None and estimator.follows_schedule
    return (*estimator.kept_state(group, scheduled), *kept_keys(group))


#: Every algorithm by the value of the group key ``algorithm``.
ALGORITHMS: dict[str, Algorithm] = {
    "lmo": Algorithm("lmo", _lmo_estimate, _lmo_state, _lmo_kept, _lmo_stored),
    # AdamW keeps, leaves and stores its two moments, whatever the group says.
    "adamw": Algorithm("adamw", _adamw, _adamw_keys, _adamw_keys, _adamw_keys, directions=False),
}

_MOMENTUM_KEYS = frozenset(
    {key for e in ESTIMATORS.values() for key in e.state} | set(_ADAMW_STATE)
)


def _apply(item: _Pending) -> None:
    """The radius and apply stages of one LMO parameter.

    ``X <- (1 - lr wd) X``, then ``X <- (1 - lr) X`` if constrained, then
    ``X <- X - t f D`` with ``lmo(M) = -f D`` and ``t`` from the radius policy.
    """
    group, p, direction = item.group, item.p, item.direction
    assert direction is not None
    view = (group["transposed"], group["blocks"])
    factor = item.norm.factor(item.norm.operand_shape(item.shape, *view))
    lr = group["lr"]
    if isinstance(lr, Tensor):  # a one-element lr of any shape acts as a scalar
        lr = lr.reshape(())
    policy = POLICIES[group["radius_policy"]]
    radius = policy.radius(
        RadiusInput(
            lr * group["scale"],
            item.k,
            item.g,
            item.operand,
            direction,
            factor,
            item.norm,
            group,
            item.dual,
        )
    )
    if group["weight_decay"] != 0.0:
        p.mul_(1.0 - lr * group["weight_decay"])
    if group["constrained"]:
        p.mul_(1.0 - lr)
    if isinstance(radius, Tensor) and radius.ndim:
        # One radius per unit of a blocked parameter (its duals are per unit): scale each
        # unit's direction by its own before the units go back into the parameter's layout.
        # (A sharded stack's direction comes back as this rank's rows: read as its units.)
        units = item.norm.operand(direction, *view) if item.layout else direction
        units = units.to(p.dtype) * (-(radius * factor)).to(p.dtype)[..., None, None]
        p.add_(item.norm.restore(units, p, *view))
        return
    # A sharded direction comes back as this rank's rows of the parameter, already restored.
    update = direction if item.layout else item.norm.restore(direction, p, *view)
    if isinstance(radius, Tensor):
        p.add_(update.to(p.dtype) * (-(radius * factor)).to(p.dtype))
    else:
        # The factor goes into alpha, never into the low-precision direction: for the Muon
        # preset this is exactly torch.optim.Muon's `param.add_(update, alpha=-adjusted_lr)`.
        p.add_(update, alpha=-(radius * factor))


class Gluon(Optimizer):
    r"""Layer-wise LMO optimizer (Gluon), with Muon and Scion as configurations.

    For every parameter ``X_i`` of a group with norm ``||.||_(i)``:

    .. math::
        M_i^k &= \beta M_i^{k-1} + (1-\beta)\, g_i^k
              \qquad(\text{Nesterov: use } g_i^k + \beta (M_i^k - g_i^k))\\
        X_i &\leftarrow (1 - \mathrm{lr}\cdot\mathrm{wd})\, X_i
              \qquad(\text{decoupled weight decay, as torch.optim.Muon})\\
        X_i &\leftarrow (1-\mathrm{lr})\, X_i \qquad(\text{only if constrained: SCG})\\
        X_i &\leftarrow X_i + t_i^k\, \mathrm{lmo}_{(i)}(M_i^k),
              \qquad t_i^k = \mathrm{lr}\cdot\mathrm{scale}\cdot\rho(k)

    **The step**, one loop of fixed stages for every group:

    1. *collect*: every (group, parameter, gradient) with a gradient;
    2. *check*: the settings users change between steps (the rest when they changed), sparse
       and complex gradients, shapes, the two-point gradients, non-finite values. Any error
       is raised here, before anything changes;
    3. *estimator*: the momentum recursion of the group's ``estimator``
       (:mod:`gluon_optim.estimators`), elementwise, on per-parameter state;
    4. *direction*: the LMO of each whole tensor, ``lmo(M) = -f D`` (and the gradient's dual
       norm where the radius needs it), as a list of requests handed to :attr:`executor`: the
       only stage that needs a full matrix. Under ``distributed="replicated"`` each request is
       computed once, by its owner rank (:mod:`gluon_optim.distributed`);
    5. *radius*: ``t`` from the group's ``radius_policy`` (:mod:`gluon_optim.radius`);
    6. *apply*: weight decay, the SCG shrink, ``X += -t f D``.

    ``algorithm="adamw"`` groups run torch.optim.AdamW's own update in place of stages 3-6, so
    a Muon preset is one optimizer object: one ``step()``, one scheduler, one ``state_dict()``.

    The radius policy is ``constant`` (``t = lr * scale``), ``l0l1`` (Gluon Theorem 1:
    ``||G||_* / (L0 + L1 ||G||_*)``) or ``theory_decay`` (Theorem 2: ``(k+1)^{-3/4}``, with
    ``beta^k = 1 - (k+1)^{-1/2}`` for the EMA). Because ``t`` is proportional to the group's
    ``lr``, any ``torch.optim.lr_scheduler`` drives it. The EMA starts at zero as in
    torch.optim.Muon and the Scion code, not at Gluon's ``M^0 = g^0``: the first direction is
    the same (the LMO is scale invariant), later momenta differ by the transient
    ``beta^(k+1) g^0``.

    Variance-reduced estimators (``mvr1``, ``mvr2``, ``mvr3``, ``storm_lowrank``) need
    ``g_prev``, the current batch's gradient at the previous iterate (``two_point="exact"``):
    pass a closure to :meth:`step` or compute it in a :meth:`previous_iterate` block, otherwise
    ``step()`` raises and changes nothing. ``momentum`` is the weight of the old momentum for
    every estimator. :meth:`state_bytes` reports the memory of momentum and two-point state.

    Reductions: with ``norm="spectral", shape_rule="muon", momentum=0.95, nesterov=True`` this is
    torch.optim.Muon; with ``scale=rho_l`` and Scion's norm table it is (unconstrained) Scion
    (Pethick et al. 2025, Algorithm 3); ``norm="sign_unscaled", momentum=0`` is sign-SGD and
    ``norm="euclidean", momentum=0`` layer-wise normalised gradient descent.

    Args:
        params: parameters, ``(name, parameter)`` pairs, or group dicts (every key is a setting
            of :data:`gluon_optim.groups.SETTINGS`). :func:`gluon_optim.param_groups` builds
            groups from a model.
        lr: learning rate (float or one-element tensor).
        distributed: where each LMO runs across processes (:mod:`gluon_optim.distributed`):
            ``"auto"`` (``"sharded"`` for DTensor parameters, else ``"local"``),
            ``"replicated"`` (DDP: each LMO on its owner rank, the directions all-gathered),
            ``"sharded"`` (FSDP2: each rank updates its rows; owners assemble whole tensors)
            or ``"local"`` (no communication).
        process_group: the group the distributed modes communicate over (default: the
            world; under ``"sharded"``, the parameters' device mesh).
        **defaults: any other setting, applied to groups that do not set it.

    Non-finite gradients: ``nonfinite="raise"`` (default) raises before any parameter or state
    changes; ``"skip"`` leaves that group's parameters and state untouched for this step;
    ``"ignore"`` does no check (and so no host synchronisation).

    References:
        Riabinin et al., "Gluon: Making Muon & Scion Great Again!", arXiv 2505.13416, Alg. 1.
        Pethick et al., "Training Deep Learning Models with Norm-Constrained LMOs",
        arXiv 2502.07529, Alg. 3.
        Qian et al., "Muon is Provably Faster with Momentum Variance Reduction",
        arXiv 2512.16598 (Gluon-MVR). Huang et al., "LiMuon", arXiv 2509.14562, Alg. 1.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Iterable[dict[str, Any]],
        lr: float | Tensor = DEFAULTS["lr"],
        *,
        distributed: str = "auto",
        process_group: ProcessGroup | None = None,
        **defaults: Unpack[GroupOptions],
    ) -> None:
        _groups.check_keys(dict(defaults), "Gluon")
        merged = dict(DEFAULTS, **defaults, lr=lr)
        _groups.validate(merged, None)
        _distributed.check_mode(distributed)
        self._two_point = TwoPoint(self)
        self._checked: dict[int, tuple[Any, ...]] = {}
        #: Every parameter's shape when it was given to the optimizer, by ``id``: its norm was
        #: checked for that shape, and a step refuses a parameter resized since.
        self._shapes: dict[int, torch.Size] = {}
        #: Where the direction stage runs (:mod:`gluon_optim.distributed` for more than one
        #: process) and how the step's decisions are agreed.
        self.executor: LocalExecutor = LocalExecutor()
        super().__init__(params, merged)
        self.executor = _distributed.executor(self, distributed, process_group, resolve_norm)
        if self.executor.materializes_state:
            self.materialize_state()
        self._built = True

    # -- groups -------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate a group completely, then add it; an invalid group leaves the optimizer as is."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        _groups.check_keys(param_group, "Param group")
        params = param_group.get("params")
        if params is None:
            raise ValueError("Param group has no 'params'")
        items = [params] if isinstance(params, Tensor) else list(params)
        if not items:
            raise ValueError("Param group has an empty 'params' list")
        names = [x[0] if isinstance(x, tuple) else None for x in items]
        tensors = [x[1] if isinstance(x, tuple) else x for x in items]
        candidate = {**self.defaults, **param_group, "params": tensors}
        if all(n is not None for n in names):
            candidate["param_names"] = names
        _groups.validate(candidate, None)
        _check_shapes(candidate, None)
        own: dict[int, int] = {}
        for i, p in enumerate(tensors):
            j = own.setdefault(id(p), i)
            if j != i:
                raise ValueError(
                    f"Parameter {_name(candidate, i)!r} is listed twice in one param group "
                    f"(also as {_name(candidate, j)!r}); list every parameter once"
                )
        seen: dict[int, str] = {}
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                seen[id(p)] = _name(group, i)
        for i, p in enumerate(tensors):
            if id(p) in seen:
                raise ValueError(
                    f"Parameter {_name(candidate, i)!r} is already in another param group "
                    f"(as {seen[id(p)]!r}); every parameter must get exactly one group"
                )
            seen[id(p)] = _name(candidate, i)
        built = self.__dict__.get("_built", False)  # a group added after construction
        if built:
            everything = [
                (_name(g, i), p, g)
                for g in (*self.param_groups, candidate)
                for i, p in enumerate(g["params"])
            ]
            err = _distributed.layout_error(self.executor.mode, everything)
            if err is not None:
                raise ValueError(err)
        super().add_param_group({**param_group, "params": items})
        for p in tensors:
            self._shapes[id(p)] = p.shape
        if built and self.executor.materializes_state:
            self.materialize_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``; everything is checked first, so a bad one changes nothing.

        Refused (``ValueError`` or ``TypeError`` naming the key and the parameter): a dict
        without ``"state"`` or ``"param_groups"``; groups that are not the optimizer's (their
        number, their sizes, an id listed twice); an invalid setting; a norm that does not fit
        a parameter's shape (as at construction); per-parameter state with a key its group's
        configuration does not keep, a tensor of the wrong shape or dtype, a non-finite value or
        a step that is not a count; and a *partial* state, one that has started (step > 0) but
        lacks ``step`` or a key every step of its configuration leaves (the next step would
        silently restart it). An empty state, ``{}`` for a parameter or ``"state": {}`` for all,
        is a fresh start for those parameters with the saved groups.

        Groups saved by 0.1.0 are upgraded: ``radius`` becomes ``radius_policy``, and LiMuon's
        ``momentum`` (its beta, the weight of the fresh gradient) becomes ``1 - beta``, the weight
        of the old momentum, with estimator ``storm`` renamed ``mvr1``.
        """
        saved_groups, saved_state = _loading.saved_parts(state_dict)
        _loading.check_layout(self.param_groups, saved_groups)
        groups = [_groups.upgrade(dict(g)) for g in saved_groups]
        for index, (group, current) in enumerate(zip(groups, self.param_groups, strict=True)):
            _groups.check_keys(group, f"load_state_dict: param group {index}")
            merged = {**DEFAULTS, **group}
            _groups.validate(merged, index)
            _check_loaded_shapes(merged, current, index)
            named = [(_name(current, i), p, merged) for i, p in enumerate(current["params"])]
            layout = _distributed.layout_error(self.executor.mode, named)
            if layout is not None:
                raise ValueError(f"load_state_dict: param group {index}: {layout}")
        state: dict[Any, Any] = {}
        error = None
        try:
            state = _loading.checked_state(self.param_groups, groups, saved_state, ALGORITHMS)
        except ValueError as e:
            error = str(e)
        except Exception as e:  # e.g. a device copy of a shard: every rank must still settle
            if not self.executor.settles_errors:
                raise
            error = f"{type(e).__name__}: {e}"
        # Under FSDP2 each rank checked its own shards: all raise if any of them found a fault.
        self.executor.settle(error)
        super().load_state_dict({**state_dict, "param_groups": groups, "state": state})
        self._store_loaded_state()
        if self.executor.materializes_state:
            self.materialize_state()  # parameters the loaded state had no entry for

    def _store_loaded_state(self) -> None:
        """Put loaded buffers back in their group's ``state_dtype``: torch's loader casts every
        state tensor to its parameter's dtype (exactly, from a narrower one), which would hold
        the state at the parameter's size until the next step rounded it again."""
        for group in self.param_groups:
            keys = set(ALGORITHMS[group["algorithm"]].stored(group))
            for p in group["params"]:
                store = store_dtype(group["state_dtype"], p.dtype)
                state = self.state.get(p)
                if store is None or not state:
                    continue
                for key in keys & set(state):
                    if isinstance(state[key], Tensor) and state[key].dtype != store:
                        state[key] = state[key].to(store)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Groups saved by an older version get today's defaults for keys they lack.
        for group in self.param_groups:
            for key, value in DEFAULTS.items():
                group.setdefault(key, value)
        self.__dict__.setdefault("_two_point", TwoPoint(self))
        self.__dict__.setdefault("_checked", {})
        # Not pickled (torch's __getstate__ keeps defaults, state and groups): a copy records
        # its parameters' shapes at its first step.
        self.__dict__.setdefault("_shapes", {})
        self.__dict__.setdefault("executor", LocalExecutor())

    def state_of(self, p: Tensor) -> MutableMapping[str, Any]:
        """``self.state[p]`` as a step reads it: for a DTensor parameter, a view whose tensors
        are this rank's local parts (:class:`gluon_optim.distributed.LocalState`)."""
        state: dict[str, Any] = self.state[p]
        if isinstance(p, DTensor):
            return _distributed.LocalState(state, p, WHOLE_STATE)
        return state

    def materialize_state(self) -> None:
        """Create every parameter's state now (zeros, step count 0), as its first step would.

        Done at construction under ``distributed="sharded"``: every rank then holds the same
        keys before any step, which ``torch.distributed.checkpoint`` needs to load a checkpoint
        into a fresh optimizer (and without which ``get_optimizer_state_dict`` would take a step
        of zero gradients to create them). A step count of 0 marks the tensors as placeholders:
        the first step drops them and starts from empty state, so results do not change. The
        keys are the ones the parameter's first step would create, found by running its
        estimator on zeros.
        """
        for group in self.param_groups:
            lmo = group["algorithm"] == "lmo"
            estimator = ESTIMATORS[group["estimator"]] if lmo else None
            for i, p in enumerate(group["params"]):
                if self.state.get(p):
                    continue
                zero = torch.zeros_like(_local(p))
                keys: list[str] = []
                whole: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
                if estimator is None:
                    keys = list(_ADAMW_STATE)
                elif estimator.whole_state is not None:  # whole, the same on every rank
                    whole = _whole_state_shapes(estimator, group, p)
                else:
                    schedule = POLICIES[group["radius_policy"]].momentum
                    scheduled = schedule is not None and estimator.follows_schedule
                    beta = schedule(0) if schedule and scheduled else group["momentum"]
                    scratch: dict[str, Any] = {}
                    estimator.update(
                        EstimatorStep(zero, zero, zero, scratch, 0, i, beta, scheduled, group)
                    )
                    keys = [*scratch]
                if lmo and needs_partner(group):
                    keys.append("prev_param" if is_exact(group) else "prev_grad")
                state = self.state_of(p)
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                for key in keys:
                    state[key] = torch.zeros_like(zero)
                for key, (shape, dtype) in whole.items():
                    state[key] = torch.zeros(shape, dtype=dtype, device=zero.device)

    def needs_closure(self) -> bool:
        """Whether :meth:`step` needs a closure (or a :meth:`previous_iterate` block).

        True when some group uses a variance-reduced estimator with ``two_point="exact"``: its
        step evaluates the same batch at the previous and the current iterate.
        """
        return any(is_exact(group) for group in self.param_groups)

    @property
    def in_previous_iterate(self) -> bool:
        """True while the parameters hold the previous iterate ``X^{k-1}``.

        That is during the first closure call of an exact two-point :meth:`step` and inside a
        :meth:`previous_iterate` block. A training step that logs metrics can skip logging then,
        so the second evaluation of the batch does not count twice (Lightning's
        ``training_step`` runs once per closure call)::

            if not opt.in_previous_iterate:
                self.log("train_loss", loss)
        """
        return getattr(self._two_point, "active", False)  # absent in older pickles

    @contextlib.contextmanager
    def previous_iterate(self) -> Iterator[None]:
        """Compute the gradient at the previous iterate, for ``two_point="exact"`` groups.

        Inside the block, the parameters of every group with a variance-reduced estimator and
        ``two_point="exact"`` hold their previous iterate ``X^{k-1}`` (the value before their
        last update); every other parameter keeps its value. Run the forward and backward pass of
        the CURRENT batch inside; on exit the gradients of those parameters are kept as the
        two-point gradient ``g_k(X^{k-1})``, the parameters are restored to ``X^k`` exactly, and
        every ``.grad`` is put back as it was before the block (so gradients computed before it
        survive, and nothing leaks out of it)::

            opt.zero_grad()
            with opt.previous_iterate():
                loss_fn(model(x), y).backward()   # g_k(X^{k-1}), kept by the optimizer
            loss_fn(model(x), y).backward()       # g_k(X^k), in .grad as usual
            opt.step()

        Like ``.grad``, the kept gradients accumulate over several blocks until :meth:`step`
        consumes them. On a parameter's first step there is no previous iterate: the block runs
        at the current point and its gradients are discarded. If the block raises, parameters,
        ``.grad`` and optimizer state are left as they were before it.
        """
        with self._two_point.block():
            yield

    # -- memory -------------------------------------------------------------------------------
    def state_bytes(self) -> dict[str, int]:
        """Bytes of optimizer state, by purpose.

        * ``"momentum"``: every estimator's buffers (momentum, MVR-2/3's gradient estimates
          ``G``, the low-rank factors of ``storm_lowrank``: ``(m + n) r + r`` numbers per
          matrix) and AdamW's ``exp_avg`` / ``exp_avg_sq``;
        * ``"two_point"``: what the variance-reduced estimators keep for their second gradient:
          the previous iterate (``two_point="exact"``), the previous gradient (``"approx"``),
          and a gradient left by :meth:`previous_iterate` and not yet consumed;
        * ``"total"``: every tensor in the state, step counters included.

        Under ``distributed="sharded"`` these are this rank's bytes: its rows of each state
        tensor, and the whole low-rank factors every rank holds.

        Transient tensors of a step are not state and are not counted: the full momentum that
        ``storm_lowrank`` rebuilds, the copy of ``X^k`` held while the closure runs at
        ``X^{k-1}``, and the LMO operands (Nesterov momenta) and directions, which the step
        holds for all LMO parameters at once between the direction and apply stages.
        """
        momentum = two_point = total = 0
        for state in self.state.values():
            for key, value in state.items():
                if not isinstance(value, Tensor):
                    continue
                value = _local(value)  # this rank's part of a sharded state
                size = value.numel() * value.element_size()
                total += size
                if key in _MOMENTUM_KEYS:
                    momentum += size
                elif key in TWO_POINT_KEYS:
                    two_point += size
        return {"momentum": momentum, "two_point": two_point, "total": total}

    # -- the step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step; ``closure`` (optional) re-evaluates the model and returns the loss.

        Groups with a variance-reduced estimator and ``two_point="exact"`` need a second
        gradient: the same batch at the previous iterate. Given a closure, the step calls it
        twice: first with those groups' parameters at ``X^{k-1}`` (every other parameter stays
        at ``X^k``), copying the gradients it produces out of ``.grad``; then, with ``X^k``
        restored bit for bit and every ``.grad`` put back, at ``X^k``. That last call's loss is
        returned and its gradients are the ones left in ``.grad``. Without a closure the
        gradient must come from a :meth:`previous_iterate` block, or the step raises
        ``RuntimeError`` and changes nothing. The closure is called once on a step that needs no
        second gradient.
        """
        loss, from_closure = None, None
        if closure is not None:
            loss, from_closure = self._two_point.run_closure(closure)

        # Stages 1-2, collect and check: look at everything, change nothing.
        work = self._collect()
        at_previous = self._two_point.gradients(work, from_closure)
        skipped = self._nonfinite_groups(work, at_previous)

        # Stage 3 for the groups that need directions; the others (AdamW) wait for stage 4.
        pending: list[_Pending] = []
        whole: list[tuple[int, dict[str, Any], _Items, Algorithm]] = []
        for index, (group, items) in enumerate(work):
            if index not in skipped and items:
                algorithm = ALGORITHMS[group["algorithm"]]
                if algorithm.directions:
                    pending += algorithm.update(self, index, group, items, at_previous)
                else:
                    whole.append((index, group, items, algorithm))
        # Stage 4, one call for every LMO of the step.
        results = self.executor.directions([item.request() for item in pending])
        for item, result in zip(pending, results, strict=True):
            item.direction, item.dual = result.direction, result.dual
        # Stages 5-6, and the algorithms that take their whole step at once.
        for item in pending:
            _apply(item)
        for index, group, items, algorithm in whole:
            algorithm.update(self, index, group, items, at_previous)
        self._two_point.finish()
        return loss

    def _collect(self) -> Work:
        """Stages 1-2: every group's (parameter, gradient) pairs, after its checks."""
        work: Work = []
        for index, group in enumerate(self.param_groups):
            _groups.validate_step(group, index, self._checked)
            items: list[tuple[Tensor, Tensor]] = []
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                # The messages' location string is built only when one is raised.
                if g.is_sparse:
                    raise RuntimeError(
                        f"Parameter {_name(group, i)!r}{where(group, index)} has a sparse "
                        "gradient; gluon-optim needs dense gradients"
                    )
                if torch.is_complex(g):
                    raise RuntimeError(
                        f"Parameter {_name(group, i)!r}{where(group, index)} has a complex gradient"
                    )
                err = _matrix_error(group, p)
                if err is not None:
                    raise ValueError(f"Parameter {_name(group, i)!r}{where(group, index)}: {err}")
                shape = self._shapes.setdefault(id(p), p.shape)
                if p.shape != shape or g.shape != shape:
                    raise ValueError(_resized(group, index, i, shape, p, g))
                if isinstance(p, DTensor) and (
                    not isinstance(g, DTensor) or g.placements != p.placements
                ):
                    # A Partial() gradient would be reduced by nobody: each rank's replica
                    # would drift. Placements are the same on every rank, so all raise.
                    got = g.placements if isinstance(g, DTensor) else "a plain tensor"
                    raise RuntimeError(
                        f"Parameter {_name(group, i)!r}{where(group, index)} is placed "
                        f"{p.placements} but its gradient is {got}; under distributed="
                        "'sharded' every gradient must be laid out like its parameter (reduce a "
                        "Partial() gradient first)"
                    )
                items.append((p, g))
            work.append((group, items))
        return work

    def _nonfinite_groups(self, work: Work, at_previous: Mapping[int, Tensor]) -> set[int]:
        """Indices of groups to skip; raises for a non-finite gradient under ``raise``.

        The executor settles, for every parameter, whether it has a gradient and whether that
        is finite (across ranks, for a distributed one, so every rank decides alike). The
        two-point gradient ``g_k(X^{k-1})`` of a parameter counts as part of its gradient.
        """
        has_grad: list[bool] = []
        finite: list[Tensor | None] = []
        for group, items in work:
            grads = {id(p): g for p, g in items}
            for p in group["params"]:
                g = grads.get(id(p))
                has_grad.append(g is not None)
                if g is None or group["nonfinite"] == "ignore":
                    finite.append(None)
                    continue
                ok = _all_finite(_local(g))
                if id(p) in at_previous:
                    ok = ok & _all_finite(_local(at_previous[id(p)]))
                finite.append(ok)
        flags = self.executor.agree(has_grad, finite)
        skipped: set[int] = set()
        pos = 0
        for index, (group, _) in enumerate(work):
            n = len(group["params"])
            bad = [i for i in range(n) if not flags[pos + i]]
            pos += n
            if not bad:
                continue
            if group["nonfinite"] == "skip":
                skipped.add(index)
                continue
            names = [_name(group, i) for i in bad]
            raise FloatingPointError(
                f"Non-finite gradient in parameter(s) {names}{where(group, index)} (NaN, inf "
                "or an entry above 1e18); nothing was updated. Set nonfinite='skip' to skip "
                "such steps instead."
            )
        return skipped


def _resized(
    group: Mapping[str, Any], index: int, i: int, shape: torch.Size, p: Tensor, g: Tensor
) -> str:
    """The step's error for a parameter (or its gradient) whose shape is not the one given."""
    what = (
        f"has shape {tuple(p.shape)}"
        if p.shape != shape
        else f"has a gradient of shape {tuple(g.shape)}"
    )
    return (
        f"Parameter {_name(group, i)!r}{where(group, index)} {what}, but it had shape "
        f"{tuple(shape)} when it was given to the optimizer, which chose its norm and state for "
        "that shape; nothing was changed. Build a new optimizer after resizing a parameter"
    )


def _check_loaded_shapes(merged: Mapping[str, Any], current: Mapping[str, Any], index: int) -> None:
    """A loaded group's norm against the parameters it will hold, as construction checks it."""
    candidate = {**merged, "params": current["params"]}
    if not candidate.get("param_names") and current.get("param_names"):
        candidate["param_names"] = current["param_names"]
    try:
        _check_shapes(candidate, index)
    except ValueError as e:
        raise ValueError(f"load_state_dict: {e}") from None


def describe(optimizer: Gluon) -> str:
    """A plain-text table with one row per parameter: what the optimizer will do to it.

    Columns: parameter name, shape, role, update (``adamw``, or the norm with its shape rule;
    ``(T)`` marks a transposed view; ``[experts: 8 units]`` the ``blocks`` of a parameter that
    holds several LMO units, whose factor is then each unit's; ``state bfloat16`` a
    ``state_dtype`` other than the parameter's), the LMO factor ``f`` of that shape
    (``lmo = -f * D``), the
    group's scale, lr, and the radius ``t = lr * scale`` of a constant-radius step; for another
    radius policy its name around ``lr * scale``, e.g. ``l0l1(1)``.
    """
    header = ("param", "shape", "role", "update", "factor", "scale", "lr", "radius t")
    rows: list[tuple[str, ...]] = []
    for index, group in enumerate(optimizer.param_groups):
        lr = group["lr"]
        lr_f = float(lr) if not isinstance(lr, Tensor) else float(lr.item())
        role = group["role"] or f"group {index}"
        for i, p in enumerate(group["params"]):
            shape = "x".join(str(s) for s in p.shape) or "scalar"
            if group["algorithm"] == "adamw":
                b1, b2 = group["betas"]
                update, factor, scale, radius = f"adamw(b={b1},{b2})", "-", "-", "-"
            else:
                norm = resolve_norm(group, p)
                update = norm.name
                if norm.name == "spectral":
                    update += f"/{group['shape_rule']}"
                if group["transposed"]:
                    update += " (T)"
                if group["blocks"] != _blocks.WHOLE:
                    units = _blocks.units(tuple(p.shape), group["transposed"], group["blocks"])
                    update += f" [{group['blocks']}: {units} units]"
                f = norm.factor(norm.operand_shape(p.shape, group["transposed"], group["blocks"]))
                factor, scale = f"{f:.4g}", f"{group['scale']:.4g}"
                radius = f"{lr_f * group['scale']:.4g}"
                if group["radius_policy"] != "constant":  # t changes every step
                    radius = f"{group['radius_policy']}({radius})"
            store = store_dtype(group["state_dtype"], p.dtype)
            if store is not None:  # only where it differs from the parameter's dtype
                update += f", state {str(store).removeprefix('torch.')}"
            rows.append(
                (_name(group, i), shape, role, update, factor, scale, f"{lr_f:.3g}", radius)
            )
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = [header, tuple("-" * w for w in widths), *rows]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )
