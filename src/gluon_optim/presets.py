"""Presets: role -> settings tables, and the factories that hand them to :class:`Gluon`.

A preset is configuration only. :func:`param_groups` turns a model into one plain-data parameter
group per role; :func:`muon`, :func:`scion`, :func:`unscion`, :func:`gluon`, :func:`gluon_mvr`
and :func:`limuon` build the one optimizer from those groups. Every factory also takes the
optimizer's own ``distributed=`` and ``process_group=`` (see :mod:`gluon_optim.distributed`).

=========  ================  ==============  ================  ==========  ==============
role       muon              scion/unscion   (scale)           gluon       (default scale)
=========  ================  ==============  ================  ==========  ==============
embedding  AdamW             colnorm (T)     50                colnorm (T) 1
tied       AdamW             sign            3000              sign        1
hidden     spectral/muon     spectral/rms    50                spectral    1
conv       spectral/muon     spectral_conv   50                spec._conv  1
head       AdamW             sign            3000              sign        1
bias       AdamW             bias_rms        50                bias_rms    1
norm       AdamW             bias_rms        50                bias_rms    1
=========  ================  ==============  ================  ==========  ==============

Scion's published NanoGPT values are lr 0.00036 with hidden scale 50 and head (tied) scale 3000,
momentum alpha = 0.1 (beta = 0.9), so the radii are t = 0.018 and 1.08 (LIONS-EPFL/scion,
``examples/modded-nanogpt``). The embedding, conv, bias and norm scales of 50 are this library's
choice (same radius as the hidden layers), not values from the paper.

Two presets change the momentum estimator rather than the norms:

* ``gluon_mvr``: the ``gluon`` column, with ``estimator="mvr1"``, ``"mvr2"`` or ``"mvr3"`` on
  every role (Gluon-MVR, arXiv 2512.16598).
* ``limuon``: the ``muon`` column's split, with hidden and conv matrices ``spectral`` under
  shape rule ``none`` (LiMuon states no shape factor), polar factor by exact SVD or
  Newton–Schulz, and ``estimator="storm_lowrank"`` (``"mvr1"`` with ``low_rank=False``);
  AdamW elsewhere (LiMuon, arXiv 2509.14562).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Unpack

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from gluon_optim import norms as _norms
from gluon_optim.blocks import WHOLE
from gluon_optim.estimators import approx_reduction
from gluon_optim.groups import DEFAULTS, PresetOptions
from gluon_optim.optimizer import Gluon
from gluon_optim.roles import ROLES, ModuleRef, RoleKey, assign_roles

__all__ = [
    "FAST_NS",
    "LiMuonOptions",
    "PRESETS",
    "gluon",
    "gluon_mvr",
    "limuon",
    "muon",
    "param_groups",
    "preset_table",
    "scion",
    "unscion",
]

PRESETS = ("muon", "scion", "unscion", "gluon", "gluon_mvr", "limuon")

#: The fast Newton–Schulz recipe (docs/performance.md), as group settings for any preset:
#: ``go.muon(model, **FAST_NS)``. Polar Express coefficients at torch's 5 steps, evaluated in
#: Gram form where that needs fewer multiply-adds. Not the default: the ``muon`` preset stays
#: bit-identical to torch.optim.Muon.
FAST_NS: dict[str, str] = {"ns_preset": "polar_express", "ns_form": "auto"}

#: Scion's norm per role (Scion Recommendation 3.1 and Table 3; Gluon section 4.1).
_SCION_NORMS: dict[str, dict[str, Any]] = {
    "embedding": {"norm": "colnorm", "transposed": True},
    "tied": {"norm": "sign"},
    "hidden": {"norm": "spectral", "shape_rule": "rms"},
    "conv": {"norm": "spectral_conv"},
    "head": {"norm": "sign"},
    "bias": {"norm": "bias_rms"},
    "norm": {"norm": "bias_rms"},
}
SCION_SCALES: dict[str, float] = {
    "embedding": 50.0,
    "tied": 3000.0,
    "hidden": 50.0,
    "conv": 50.0,
    "head": 3000.0,
    "bias": 50.0,
    "norm": 50.0,
}


def preset_table(
    preset: str,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    **options: Any,
) -> dict[str, dict[str, Any]]:
    """The settings of every role under ``preset`` (plain data, one dict per role).

    ``options`` are the keyword arguments of the matching factory (:func:`muon`,
    :func:`scion`, ...), minus the model and role arguments: the preset's own options, and any
    group key, which overrides the preset's value on the groups the options reach (the LMO
    groups of ``muon`` and ``limuon``, and their AdamW groups too for ``state_dtype`` and
    ``nonfinite``; every group of the others). ``settings`` then overrides
    per role, for every preset: ``settings={"head": {"lr": 1e-3}}``.
    """
    fixes = {
        "params": "pass the model (or parameters) as the first argument",
        "param_names": "names come from the model",
        "role": "assign parameters to roles with roles={pattern or class: role}",
        "name": "name one role's group with settings={'hidden': {'name': ...}}",
    }
    for key, fix in fixes.items():
        if key in options:
            raise ValueError(f"{preset}: option {key!r} is set per group by the preset; {fix}")
    if preset == "muon":
        table = _muon_table(**options)
    elif preset in ("scion", "unscion"):
        options.setdefault("constrained", preset == "scion")
        table = _scion_table(**options)
    elif preset == "gluon":
        table = _gluon_table(**options)
    elif preset == "gluon_mvr":
        table = _gluon_mvr_table(**options)
    elif preset == "limuon":
        table = _limuon_table(**options)
    else:
        raise ValueError(f"Unknown preset {preset!r}; expected one of {PRESETS}")
    for role, values in (settings or {}).items():
        if role not in ROLES:
            raise ValueError(f"settings[{role!r}]: unknown role; expected one of {ROLES}")
        if not isinstance(values, Mapping):
            raise ValueError(f"settings[{role!r}] must be a dict of group keys, got {values!r}")
        for key in ("params", "param_names", "role"):
            if key in values:
                raise ValueError(f"settings[{role!r}][{key!r}]: set by the preset; use roles=")
        table[role].update(values)
    return table


#: Group settings of the whole optimizer, which a preset's AdamW groups take from its matrices.
_WHOLE_OPTIMIZER = ("state_dtype", "nonfinite")


def _with_adamw(
    matrix: dict[str, Any],
    lr: float | Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> dict[str, dict[str, Any]]:
    """Hidden and conv matrices get ``matrix``; every other role torch.optim.AdamW's update.

    The settings of the whole optimizer rather than of the matrices' update follow the
    matrices': ``state_dtype`` (``go.muon(model, state_dtype="bfloat16")`` halves every
    moment) and ``nonfinite`` (``nonfinite="skip"`` skips a NaN step in the AdamW groups too,
    where they used to raise).
    """
    adam = dict(algorithm="adamw", lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    for key in _WHOLE_OPTIMIZER:
        if key in matrix:
            adam[key] = matrix[key]
    return {role: dict(matrix if role in ("hidden", "conv") else adam) for role in ROLES}


def _muon_table(
    *,
    lr: float | Tensor = 0.02,
    momentum: float = 0.95,
    nesterov: bool = True,
    weight_decay: float = 0.0,
    shape_rule: str = "muon",
    ns_preset: str = "jordan",
    ns_steps: int = 5,
    adamw_lr: float | Tensor = 3e-4,
    adamw_betas: tuple[float, float] = (0.9, 0.95),
    adamw_eps: float = 1e-10,
    adamw_weight_decay: float = 0.0,
    **lmo_options: Any,
) -> dict[str, dict[str, Any]]:
    matrix = {
        **dict(
            algorithm="lmo",
            norm="spectral",
            shape_rule=shape_rule,
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            ns_preset=ns_preset,
            ns_steps=ns_steps,
        ),
        **lmo_options,
    }
    return _with_adamw(matrix, adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay)


def _scion_table(
    *,
    lr: float | Tensor = 0.00036,
    momentum: float = 0.9,
    constrained: bool = True,
    scales: Mapping[str, float] | None = None,
    weight_decay: float = 0.0,
    **lmo_options: Any,
) -> dict[str, dict[str, Any]]:
    scale = dict(SCION_SCALES)
    for role, value in (scales or {}).items():
        if role not in ROLES:
            raise ValueError(f"scales[{role!r}]: unknown role; expected one of {ROLES}")
        scale[role] = value
    # Later entries win: a group key in the options overrides the norm table's.
    return {
        role: {
            **dict(
                algorithm="lmo",
                lr=lr,
                scale=scale[role],
                momentum=momentum,
                constrained=constrained,
                weight_decay=weight_decay,
            ),
            **_SCION_NORMS[role],
            **lmo_options,
        }
        for role in ROLES
    }


def _gluon_table(
    *, lr: float | Tensor = DEFAULTS["lr"], **lmo_options: Any
) -> dict[str, dict[str, Any]]:
    return {
        role: {"algorithm": "lmo", "lr": lr, **_SCION_NORMS[role], **lmo_options} for role in ROLES
    }


def _gluon_mvr_table(
    *,
    variant: int = 1,
    lr: float | Tensor = DEFAULTS["lr"],
    momentum: float = DEFAULTS["momentum"],
    mvr_q: float = DEFAULTS["mvr_q"],
    two_point: str = "exact",
    **lmo_options: Any,
) -> dict[str, dict[str, Any]]:
    if isinstance(variant, bool) or variant not in (1, 2, 3):
        raise ValueError(f"gluon_mvr: variant must be 1, 2 or 3, got {variant!r}")
    if two_point == "approx" and not lmo_options.get("allow_degenerate", False):
        raise ValueError(
            f"gluon_mvr: {approx_reduction(f'mvr{variant}')}. Use two_point='exact' (the "
            "paper's method), or go.gluon(model, estimator='mars', two_point='approx') for a "
            "one-gradient correction that keeps a momentum"
        )
    vr = dict(estimator=f"mvr{variant}", momentum=momentum, mvr_q=mvr_q, two_point=two_point)
    return _gluon_table(lr=lr, **{**vr, **lmo_options})


def _limuon_table(
    *,
    rank: int = 8,
    lr: float | Tensor = 0.02,
    beta: float = 0.1,
    method: str = "svd",
    oversampling: int = 5,
    two_point: str = "exact",
    low_rank: bool = True,
    shape_rule: str = "none",
    weight_decay: float = 0.0,
    rsvd_seed: int = 0,
    adamw_lr: float | Tensor = 3e-4,
    adamw_betas: tuple[float, float] = (0.9, 0.95),
    adamw_eps: float = 1e-10,
    adamw_weight_decay: float = 0.0,
    **lmo_options: Any,
) -> dict[str, dict[str, Any]]:
    if method not in ("svd", "newton_schulz"):
        raise ValueError(f"limuon: unknown method {method!r}; expected 'svd' or 'newton_schulz'")
    if not isinstance(low_rank, bool):
        raise ValueError(f"limuon: low_rank must be True or False, got {low_rank!r}")
    if "momentum" in lmo_options:
        raise ValueError(
            "limuon: pass LiMuon's beta as beta= (the weight of the fresh gradient, default "
            "0.1); since 0.2.0 the group key momentum means the weight of the old momentum, "
            "which limuon sets to 1 - beta"
        )
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 < beta <= 1.0:
        raise ValueError(f"limuon: beta must be a number in (0, 1], got {beta!r}")
    if not low_rank and two_point == "approx" and not lmo_options.get("allow_degenerate", False):
        # Option 1 is estimator='mvr1', whose approx mode the groups refuse: say so in limuon's
        # words (option 2's truncated state keeps its correction from telescoping).
        raise ValueError(
            f"limuon: low_rank=False is estimator='mvr1', and {approx_reduction('mvr1')}. Use "
            "two_point='exact' (the paper's method), or low_rank=True"
        )
    matrix = {
        **dict(
            algorithm="lmo",
            norm="spectral",
            shape_rule=shape_rule,
            polar_method=method,
            estimator="storm_lowrank" if low_rank else "mvr1",
            rank=rank,
            oversampling=oversampling,
            rsvd_seed=rsvd_seed,
            two_point=two_point,
            lr=lr,
            # LiMuon's beta weighs the fresh gradient: M <- g + (1 - beta)(M - g_prev).
            momentum=1.0 - beta,
            weight_decay=weight_decay,
        ),
        **lmo_options,
    }
    return _with_adamw(matrix, adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay)


def param_groups(
    model: nn.Module,
    preset: str = "gluon",
    *,
    head: ModuleRef | None = None,
    embedding: ModuleRef | None = None,
    roles: Mapping[RoleKey, Any] | None = None,
    blocks: Mapping[RoleKey, Any] | None = None,
    fused: str = "whole",
    **options: Any,
) -> list[dict[str, Any]]:
    """One plain-data parameter group per role present in ``model``, under ``preset``.

    Weights stored transposed (Hugging Face ``Conv1D``) get a group of their own, named
    ``"<role>_transposed"``, whose ``transposed`` key is flipped where the role's norm reads
    matrices, so their factors are those of an ``nn.Linear`` of the same layer. Weights that
    hold several LMO units (stacks of experts, fused blocks: :mod:`gluon_optim.blocks`) get a
    group per ``blocks`` value, named ``"<role>[<blocks>]"``, where the role's norm reads
    matrices (elsewhere the units change nothing). Each group's ``name`` is its role unless
    ``settings`` names it.

    Args:
        model: the network; every trainable parameter must get exactly one role
            (see :func:`gluon_optim.roles.assign_roles`).
        preset: one of :data:`PRESETS`: ``"muon"``, ``"scion"``, ``"unscion"``, ``"gluon"``,
            ``"gluon_mvr"`` or ``"limuon"``.
        head, embedding, roles, blocks, fused: passed to
            :func:`~gluon_optim.roles.assign_roles` (``blocks``: ``{parameter-name pattern or
            module class: blocks}``; ``fused``: ``"whole"``, ``"projections"`` or ``"heads"``).
        **options: the preset's options, any group key but ``blocks`` (see
            :func:`preset_table`), and ``settings={role: {key: value}}``.

    Returns:
        Groups in role order, each ``{"params": [(name, p), ...], "role": role, "name": ...,
        ...settings}``, ready for :class:`~gluon_optim.Gluon`.
    """
    if blocks is not None and not isinstance(blocks, Mapping):
        raise ValueError(
            f"blocks={blocks!r}: for a model, blocks is per parameter; pass "
            "blocks={parameter-name pattern or module class: blocks}, e.g. "
            "{'*.c_attn.weight': 'chunks=3'}"
        )
    table = preset_table(preset, **options)
    by_role: dict[tuple[str, bool, str], list[tuple[str, nn.Parameter]]] = {}
    assigned = assign_roles(
        model, head=head, embedding=embedding, roles=roles, blocks=blocks, fused=fused
    )
    for a in assigned:
        reads = _reads_matrices(table[a.role])
        split = a.blocks if reads else WHOLE
        by_role.setdefault((a.role, a.transposed and reads, split), []).append((a.name, a.param))
    groups: list[dict[str, Any]] = []
    for (role, flip, split), params in sorted(
        by_role.items(), key=lambda kv: (ROLES.index(kv[0][0]), kv[0][2] != WHOLE)
    ):
        group = {"params": params, "role": role, "name": role, **table[role]}
        if flip:
            group["transposed"] = not group.get("transposed", DEFAULTS["transposed"])
            group["name"] = f"{group['name']}_transposed"
        if split != WHOLE:
            group["blocks"] = split
            group["name"] = f"{group['name']}[{split}]"
        groups.append(group)
    return groups


def _reads_matrices(settings: Mapping[str, Any]) -> bool:
    """Whether a role's LMO reads a weight as a ``(d_out, d_in)`` matrix (layout matters)."""
    if settings.get("algorithm", DEFAULTS["algorithm"]) != "lmo":
        return False
    norm = settings.get("norm", DEFAULTS["norm"])
    # An unknown norm name is left for Gluon's validation to report.
    return norm == "auto" or getattr(_norms.NORMS.get(norm), "kind", None) == "matrix"


#: Options of the optimizer object rather than of its groups, accepted by every preset.
ENGINE_KEYS = ("distributed", "process_group")


def _engine(options: dict[str, Any]) -> dict[str, Any]:
    """Take the optimizer-level options (``distributed``, ``process_group``) out of ``options``."""
    return {key: options.pop(key) for key in ENGINE_KEYS if key in options}


def _from_model(
    model: nn.Module,
    preset: str,
    refs: tuple[ModuleRef | None, ModuleRef | None, Mapping[RoleKey, Any] | None],
    **options: Any,
) -> Gluon:
    """One :class:`Gluon` over ``param_groups(model, preset, ...)``; ``refs`` = head, embedding,
    roles. The preset's ``lr`` is also the optimizer's default for groups added later."""
    head, embedding, roles = refs
    engine = _engine(options)
    # A mapping is per parameter; param_groups refuses a single value with the reason.
    blocks, fused = options.pop("blocks", None), options.pop("fused", "whole")
    groups = param_groups(
        model,
        preset,
        head=head,
        embedding=embedding,
        roles=roles,
        blocks=blocks,
        fused=fused,
        **options,
    )
    return Gluon(groups, lr=options.get("lr", DEFAULTS["lr"]), **engine)


def _named_list(params: Iterable[Any]) -> list[Any]:
    items = list(params)
    if not items:
        raise ValueError("optimizer got an empty parameter list")
    return items


def _matrices_only(
    preset: str,
    params: Iterable[Any],
    settings: dict[str, Any],
    lr: float | Tensor,
    engine: dict[str, Any],
) -> Gluon:
    """One group of matrices for a matrix-only preset given parameters instead of a model."""
    items = _named_list(params)
    for i, item in enumerate(items):
        p = item[1] if isinstance(item, tuple) else item
        name = item[0] if isinstance(item, tuple) else f"params[{i}]"
        if isinstance(p, torch.Tensor) and p.ndim < 2:
            raise ValueError(
                f"{preset}: parameter {name!r} has shape {tuple(p.shape)}; {preset} takes "
                "matrices. Pass the model instead to route vectors to AdamW."
            )
    return Gluon([{"params": items, "role": "hidden", **settings}], lr=lr, **engine)


def muon(
    model_or_params: nn.Module | Iterable[Tensor] | Iterable[tuple[str, Tensor]],
    *,
    lr: float | Tensor = 0.02,
    momentum: float = 0.95,
    nesterov: bool = True,
    weight_decay: float = 0.0,
    head: ModuleRef | None = None,
    embedding: ModuleRef | None = None,
    roles: Mapping[RoleKey, Any] | None = None,
    **options: Any,
) -> Gluon:
    """Muon: spectral LMO with Muon's shape rule on hidden matrices, AdamW on the rest.

    .. math::
        M \\leftarrow \\beta M + (1-\\beta) g,\\quad
        X \\leftarrow (1-\\mathrm{lr}\\cdot\\mathrm{wd}) X
            - \\mathrm{lr}\\sqrt{\\max(1, d_{out}/d_{in})}\\, \\mathrm{NS}_5(g + \\beta(M - g))

    Given a model, hidden linear and conv weights (conv kernels flattened to
    ``(C_out, C_in·k·k)``) take the Muon update and every other role AdamW (``adamw_lr``,
    ``adamw_betas``, ``adamw_eps``, ``adamw_weight_decay``), all in one optimizer. Given a list
    of parameters, every one must be a matrix and takes the Muon update.

    With the same settings (``shape_rule="muon"``, Jordan's coefficients, 5 steps in bfloat16)
    it produces the iterates of ``torch.optim.Muon(adjust_lr_fn="original")``. The defaults
    follow Keller Jordan's Muon (lr 0.02, no weight decay), not torch's (lr 1e-3, wd 0.1).

    Args:
        model_or_params: a model, or parameters / ``(name, parameter)`` pairs.
        lr, momentum, nesterov, weight_decay: the Muon groups' settings.
        head, embedding, roles: role assignment (models only); see :func:`param_groups`.
        **options: ``shape_rule``, ``ns_preset``, ``ns_steps``, the ``adamw_*`` options, or any
            other group key for the Muon groups.

    References:
        Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks";
        torch.optim.Muon.
    """
    opts = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, **options)
    if isinstance(model_or_params, nn.Module):
        return _from_model(model_or_params, "muon", (head, embedding, roles), **opts)
    engine = _engine(opts)
    return _matrices_only("muon", model_or_params, _muon_table(**opts)["hidden"], lr, engine)


def scion(
    model: nn.Module,
    *,
    lr: float | Tensor = 0.00036,
    momentum: float = 0.9,
    constrained: bool = True,
    scales: Mapping[str, float] | None = None,
    head: ModuleRef | None = None,
    embedding: ModuleRef | None = None,
    roles: Mapping[RoleKey, Any] | None = None,
    **options: Any,
) -> Gluon:
    """Scion (``constrained=True``) or unconstrained Scion: a norm per role, no Adam anywhere.

    .. math::
        M \\leftarrow \\beta M + (1-\\beta) g,\\qquad
        X_\\ell \\leftarrow (1-\\gamma)\\,X_\\ell + \\gamma\\rho_\\ell\\,
            \\mathrm{lmo}_\\ell(M_\\ell)
        \\quad(\\text{unconstrained: drop the } (1-\\gamma))

    Norms by role: embedding ``colnorm`` on the transposed weight, tied embedding/head and head
    ``sign``, hidden ``spectral`` (RMS->RMS), conv ``spectral_conv``, biases and norm gains
    ``bias_rms``. ``scales`` overrides the per-role radius rho (defaults in
    :data:`SCION_SCALES`). ``momentum`` is beta, the weight on the old momentum: Scion's code
    argument ``momentum=0.1`` is ``momentum=0.9`` here.

    References:
        Pethick et al. 2025, "Training Deep Learning Models with Norm-Constrained LMOs"
        (arXiv 2502.07529), Algorithm 3 and Recommendation 3.1.
    """
    preset = "scion" if constrained else "unscion"
    opts = dict(lr=lr, momentum=momentum, constrained=constrained, scales=scales, **options)
    return _from_model(model, preset, (head, embedding, roles), **opts)


def unscion(model: nn.Module, **kwargs: Any) -> Gluon:
    """Unconstrained Scion (uSCG): :func:`scion` with ``constrained=False``."""
    if "constrained" in kwargs:
        raise ValueError("unscion() is unconstrained by definition; use scion(constrained=...)")
    return scion(model, constrained=False, **kwargs)


def gluon(
    model: nn.Module,
    *,
    lr: float | Tensor = DEFAULTS["lr"],
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    head: ModuleRef | None = None,
    embedding: ModuleRef | None = None,
    roles: Mapping[RoleKey, Any] | None = None,
    **options: Any,
) -> Gluon:
    """Gluon with any role -> settings mapping.

    Starts from Scion's norm table with scale 1 for every role; ``settings`` overrides per role
    (``{"hidden": {"scale": 50, "radius": "l0l1", "l1": 70}}``) and ``options`` set any group
    key for every role.
    """
    return _from_model(
        model, "gluon", (head, embedding, roles), lr=lr, settings=settings, **options
    )


def gluon_mvr(
    model: nn.Module,
    variant: int = 1,
    *,
    lr: float | Tensor = DEFAULTS["lr"],
    momentum: float = DEFAULTS["momentum"],
    mvr_q: float = DEFAULTS["mvr_q"],
    two_point: str = "exact",
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    head: ModuleRef | None = None,
    embedding: ModuleRef | None = None,
    roles: Mapping[RoleKey, Any] | None = None,
    **options: Any,
) -> Gluon:
    """Gluon-MVR-1/2/3: the :func:`gluon` preset with a variance-reduced momentum on every role.

    .. math::
        \\text{MVR-1: } M^k = g_k(X^k) + \\beta (M^{k-1} - g_k(X^{k-1}))

    MVR-2 runs that recursion with weight ``1 - mvr_q`` on a gradient estimate ``G`` and keeps
    an EMA of it; MVR-3 adds ``beta (g_k(X^k) - g_k(X^{k-1}))`` to MVR-2 (our reconstruction:
    the paper's Algorithm 5 could not be read). See :mod:`gluon_optim.estimators` and
    ``docs/variance_reduction.md``.

    Every step needs the current batch's gradient at the previous iterate (``two_point="exact"``,
    the paper's method): call ``opt.step(closure)`` or compute it inside
    ``with opt.previous_iterate(): ...``. ``two_point="approx"`` raises: with the previous
    step's gradient instead, each variant reduces to a simpler method (no momentum, an EMA,
    MARS with gamma 1). ``go.gluon(model, estimator="mars", two_point="approx")`` is the
    one-gradient correction that keeps a momentum.

    Args:
        model: the network; roles and norms as :func:`gluon` (Scion's norm table, scale 1).
        variant: 1, 2 or 3.
        lr, momentum: the radius ``t = lr * scale`` and ``beta`` (weight on the old momentum,
            as in Gluon; the paper's beta on the correction term is the same number for MVR-1).
        mvr_q: MVR-2/3's ``q`` in ``[0, 1]``.
        two_point: ``"exact"`` (``"approx"`` raises, see above, unless the group setting
            ``allow_degenerate=True`` asks for the reduction on purpose).
        settings, head, embedding, roles, **options: as :func:`gluon`.

    References:
        Qian, Rammal, Kovalev, Richtárik, "Muon is Provably Faster with Momentum Variance
        Reduction", arXiv 2512.16598, Algorithms 2, 4, 5.
    """
    opts = dict(variant=variant, lr=lr, momentum=momentum, mvr_q=mvr_q, two_point=two_point)
    return _from_model(
        model, "gluon_mvr", (head, embedding, roles), settings=settings, **opts, **options
    )


class LiMuonOptions(PresetOptions, total=False):
    """The keyword options of :func:`limuon` (defaults in its docstring), for the type checker."""

    distributed: str
    process_group: ProcessGroup | None
    lr: float | Tensor
    beta: float
    method: str
    low_rank: bool
    adamw_lr: float | Tensor
    adamw_betas: tuple[float, float]
    adamw_eps: float
    adamw_weight_decay: float


def limuon(
    model_or_params: nn.Module | Iterable[Tensor] | Iterable[tuple[str, Tensor]],
    rank: int = 8,
    *,
    head: ModuleRef | None = None,
    embedding: ModuleRef | None = None,
    roles: Mapping[RoleKey, Any] | None = None,
    **options: Unpack[LiMuonOptions],
) -> Gluon:
    """LiMuon: a STORM momentum with a randomized-SVD low-rank state, and a polar step.

    .. math::
        M_{t+1} = g(W_{t+1}) + (1 - \\beta)(\\hat M_t - g(W_t)),\\qquad
        W_{t+1} = W_t - \\eta\\, U V^T \\text{ of } M_{t+1}

    where ``M_hat`` is the rank-``rank`` randomized SVD of the previous momentum, stored as
    factors: ``(m + n) r + r`` numbers per matrix instead of ``m n`` (option 2,
    ``estimator="storm_lowrank"``). ``low_rank=False`` keeps the full momentum (option 1, which
    is Gluon-MVR-1: ``estimator="mvr1"``); a rank ``>= min(m, n)`` gives the same iterates as
    option 1 up to rounding.

    ``beta`` is LiMuon's, the SMALL weight of the fresh gradient (the STORM convention; the
    default 0.1 keeps 0.9 of the correction). The preset sets the group key ``momentum`` (the
    weight of the old momentum, as everywhere in gluon-optim) to ``1 - beta``.

    Given a model, hidden linear and conv weights (conv kernels flattened to
    ``(C_out, C_in·k·k)``) take the LiMuon update and every other role AdamW (``adamw_lr``,
    ``adamw_betas``, ``adamw_eps``, ``adamw_weight_decay``), as the :func:`muon` preset does.
    Given a list of parameters, every one must be a matrix.

    Args:
        model_or_params: a model, or parameters / ``(name, parameter)`` pairs.
        rank: rank ``r`` of the stored momentum (``storm_lowrank``).
        lr: the step ``eta`` (radius ``t = lr``); default 0.02.
        beta: LiMuon's beta in ``(0, 1]`` (``momentum = 1 - beta``); default 0.1.
        method: ``"svd"`` (default: exact polar factor, LiMuon's Algorithm 1) or
            ``"newton_schulz"`` (LiMuon-NS: Jordan's quintic coefficients, 5 steps in bfloat16
            by default).
        oversampling: extra sketch columns ``s`` (LiMuon asks for ``s >= 2``; 5 is our default).
        two_point: ``"exact"`` (default: two gradients of the same batch per step, as the
            paper; use ``opt.step(closure)`` or ``opt.previous_iterate()``) or ``"approx"``
            (refused with ``low_rank=False``: that is MVR-1's degenerate approx mode).
        low_rank: ``True`` (default, option 2); ``False`` for option 1 (full-rank STORM momentum,
            which is ``estimator="mvr1"``).
        shape_rule: the spectral shape factor. LiMuon states none (``W - eta U V^T``), so the
            default is ``"none"``; ``"muon"`` or ``"rms"`` rescale as Muon or Scion do.
        weight_decay: decoupled, as torch.optim.Muon (LiMuon has none); default 0.
        head, embedding, roles: role assignment (models only); see :func:`param_groups`.
        **options: ``rsvd_seed``, ``ns_preset``, ``ns_steps``, the ``adamw_*`` options, or any
            other group key for the LiMuon groups.

    References:
        Huang, Luo, Chen, "LiMuon: Light and Fast Muon Optimizer for Large Models",
        arXiv 2509.14562, Algorithms 1-3.
    """
    # The defaults live in _limuon_table alone; the docstring states them.
    opts: dict[str, Any] = dict(options, rank=rank)
    if isinstance(model_or_params, nn.Module):
        return _from_model(model_or_params, "limuon", (head, embedding, roles), **opts)
    engine = _engine(opts)
    hidden = _limuon_table(**opts)["hidden"]
    return _matrices_only("limuon", model_or_params, hidden, hidden["lr"], engine)
