"""Optimizers reachable by name from the lab, with their tuned defaults.

Every entry builds a list of ``torch.optim.Optimizer`` objects for a model; the training loop
steps, schedules and checkpoints them together. Ours are one ``gluon_optim.Gluon`` each;
``torch-muon`` is the peer: ``torch.optim.Muon`` on the hidden matrices plus
``torch.optim.AdamW`` on the rest, the split its documentation recommends.

Tuned defaults come from ``gluon-optim sweep`` runs recorded in ``docs/lab.md``: the same budget
for every optimizer, so no comparison is won by leaving a baseline untuned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import gluon_optim as go

Factory = Callable[..., list[torch.optim.Optimizer]]


@dataclass(frozen=True)
class OptimizerEntry:
    """A named optimizer: how to build it and what ``lr`` means for it."""

    name: str
    build: Factory
    help: str
    # Tuned default lr per model family ("gpt", "cnn", "vit") and extra options.
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    # A gluon_optim optimizer, which takes distributed="replicated" under data parallelism;
    # the torch peers run as they are (every rank repeats their whole step).
    gluon: bool = True
    # Its factory takes fit=FILE (fitted (L0, L1) per role -> Theorem 1 radii).
    takes_fit: bool = False
    # Its factory takes state_dtype= (every gluon_optim optimizer, and adamw through our
    # AdamW groups; torch.optim.Muon has no such option).
    takes_state_dtype: bool = True


def _adamw(model: nn.Module, lr: float, **options: Any) -> list[torch.optim.Optimizer]:
    opts = {"betas": (0.9, 0.95), "weight_decay": 0.0, **options}
    if opts.get("state_dtype", "auto") != "auto":
        # torch.optim.AdamW keeps its moments in the parameters' dtype; our AdamW groups run
        # torch's own update (bit for bit) and can store them narrower.
        return [go.Gluon(model.named_parameters(), lr=lr, algorithm="adamw", **opts)]
    opts.pop("state_dtype", None)
    return [torch.optim.AdamW(model.parameters(), lr=lr, **opts)]


def _muon(model: nn.Module, lr: float, **options: Any) -> list[torch.optim.Optimizer]:
    return [go.muon(model, lr=lr, **options)]


def _torch_muon(model: nn.Module, lr: float, **options: Any) -> list[torch.optim.Optimizer]:
    # The same split as our muon preset (hidden + conv matrices to Muon), but torch.optim.Muon
    # only accepts 2-D parameters, so conv kernels go to AdamW here.
    adamw_lr = options.pop("adamw_lr", 3e-4)
    hidden: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    for a in go.assign_roles(model):
        (hidden if a.role == "hidden" and a.param.ndim == 2 else rest).append(a.param)
    muon_opts = {"momentum": 0.95, "nesterov": True, "weight_decay": 0.0, **options}
    return [
        torch.optim.Muon(hidden, lr=lr, adjust_lr_fn="original", **muon_opts),
        torch.optim.AdamW(rest, lr=adamw_lr, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0),
    ]


def _scion(model: nn.Module, lr: float, **options: Any) -> list[torch.optim.Optimizer]:
    return [go.scion(model, lr=lr, **options)]


def _unscion(model: nn.Module, lr: float, **options: Any) -> list[torch.optim.Optimizer]:
    return [go.unscion(model, lr=lr, **options)]


def _gluon(model: nn.Module, lr: float, **options: Any) -> list[torch.optim.Optimizer]:
    # fit=FILE: Gluon's Theorem 1 radius with the (L0, L1) of each role fitted by
    # `gluon-optim smoothness` (fits-role.json); explicit settings still win per key.
    fit = options.pop("fit", None)
    if fit is not None:
        theory = go.smoothness.radius_settings(go.smoothness.load_fits(fit), by="role")
        user = options.pop("settings", None) or {}
        roles = set(theory) | set(user)
        options["settings"] = {r: {**theory.get(r, {}), **user.get(r, {})} for r in roles}
    opt = go.gluon(model, lr=lr, **options)
    if fit is not None:
        # A role the fits do not cover would train at lr * scale = 1: refuse, do not guess.
        left = [g["role"] for g in opt.param_groups if g["radius_policy"] != "l0l1"]
        if left:
            raise ValueError(
                f"fit={fit}: no fitted constants for role(s) {left} of this model (fits from "
                "another model?); they would train at radius lr * scale = 1"
            )
    return [opt]


def _vr(estimator: str, two_point: str) -> Factory:
    # Unconstrained Scion's norms and scales, so against `unscion` only the estimator differs.
    def build(model: nn.Module, lr: float, **options: Any) -> list[torch.optim.Optimizer]:
        scales = {role: {"scale": s} for role, s in go.presets.SCION_SCALES.items()}
        opts = {"momentum": 0.9, "two_point": two_point, "settings": scales, **options}
        if two_point == "approx" and estimator != "mars":
            # The gluon-mvr*-approx entries exist to show the reduction, so they opt in.
            opts.setdefault("allow_degenerate", True)
        return [go.gluon(model, lr=lr, estimator=estimator, **opts)]

    return build


def _limuon(method: str) -> Factory:
    # Muon's shape rule, so against `muon` only the estimator (and state) differs; the paper
    # states no shape factor.
    def build(model: nn.Module, lr: float, **options: Any) -> list[torch.optim.Optimizer]:
        opts = {"method": method, "shape_rule": "muon", **options}
        return [go.limuon(model, lr=lr, **opts)]

    return build


_FAMILIES = ("gpt", "cnn", "vit")


def _every_family(**values: Any) -> dict[str, dict[str, Any]]:
    """The same tuned defaults for every model family."""
    return {family: dict(values) for family in _FAMILIES}


#: Muon's tuned lr (docs/lab.md), shared by the optimizers compared against it.
_MUON = {"lr": 0.02, "adamw_lr": 3e-3}

OPTIMIZERS: dict[str, OptimizerEntry] = {
    e.name: e
    for e in [
        OptimizerEntry(
            "adamw",
            _adamw,
            "torch.optim.AdamW on every parameter (betas 0.9/0.95, no weight decay)",
            {"gpt": {"lr": 3e-3}, "cnn": {"lr": 6e-3}, "vit": {"lr": 3e-3}},
            gluon=False,
        ),
        OptimizerEntry(
            "muon",
            _muon,
            "gluon_optim.muon: Muon on hidden/conv matrices + AdamW (adamw_lr) on the rest",
            _every_family(**_MUON),
        ),
        OptimizerEntry(
            "muon-fast",
            _muon,
            "gluon_optim.muon with the fast recipe: Polar Express coefficients, Gram-form "
            "Newton–Schulz where it is cheaper (docs/performance.md)",
            # muon's tuned lr, not re-swept; docs/performance.md compares the two runs.
            _every_family(**_MUON, **go.presets.FAST_NS),
        ),
        OptimizerEntry(
            "torch-muon",
            _torch_muon,
            "torch.optim.Muon on 2-D hidden matrices + torch.optim.AdamW (adamw_lr) on the rest",
            _every_family(**_MUON),
            gluon=False,
            takes_state_dtype=False,
        ),
        OptimizerEntry(
            "scion",
            _scion,
            "gluon_optim.scion (constrained): a norm per role, lr * scale = radius",
            {"gpt": {"lr": 3e-4}, "cnn": {"lr": 3e-4}, "vit": {"lr": 1.5e-4}},
        ),
        OptimizerEntry(
            "unscion",
            _unscion,
            "gluon_optim.unscion: unconstrained Scion (uSCG)",
            {"gpt": {"lr": 3e-4}, "cnn": {"lr": 1.5e-4}, "vit": {"lr": 1.5e-4}},
        ),
        OptimizerEntry(
            "gluon",
            _gluon,
            "gluon_optim.gluon: Scion's norm table with scale 1; set anything with --opt",
            _every_family(lr=0.02),
            takes_fit=True,
        ),
    ]
}
#: Kept for the record: each approx variant is a simpler method (docs/variance_reduction.md).
_APPROX_REDUCES_TO = {1: "no momentum", 2: "the EMA started at g^0", 3: "MARS with gamma 1"}
for _variant in (1, 2, 3):
    for _mode in ("exact", "approx"):
        _name = f"gluon-mvr{_variant}" + ("" if _mode == "exact" else "-approx")
        _reduces = "" if _mode == "exact" else f" (reduces to {_APPROX_REDUCES_TO[_variant]})"
        OPTIMIZERS[_name] = OptimizerEntry(
            _name,
            _vr(f"mvr{_variant}", _mode),
            f"Gluon-MVR variant {_variant}, {_mode} two-point gradient{_reduces}, "
            "unscion's norms and scales",
            # gpt: from the gluon-mvr1 sweep (docs/lab.md); cnn/vit: unscion's, not swept.
            _every_family(lr=1.5e-4),
        )
OPTIMIZERS["gluon-mars"] = OptimizerEntry(
    "gluon-mars",
    _vr("mars", "approx"),
    "Gluon with MARS-approx momentum (one gradient per step; --opt mars_gamma=G, default "
    "0.025), unscion's norms and scales",
    _every_family(lr=1.5e-4),  # gluon-mvr's lr, not swept for MARS
)
for _method, _suffix in (("svd", ""), ("newton_schulz", "-ns")):
    OPTIMIZERS[f"limuon{_suffix}"] = OptimizerEntry(
        f"limuon{_suffix}",
        _limuon(_method),
        f"gluon_optim.limuon ({_method}): STORM momentum with a rank-r randomized-SVD state "
        "(--opt rank=R, --opt low_rank=false for full rank), AdamW on the rest",
        _every_family(**_MUON),
    )


def model_family(model_name: str) -> str:
    """``gpt``, ``cnn`` or ``vit`` from a model preset name."""
    for family in _FAMILIES:
        if model_name.startswith(family):
            return family
    return "gpt"


def resolve(
    name: str, model_name: str, lr: float | None, options: dict[str, Any]
) -> tuple[float, dict[str, Any]]:
    """The lr and options an optimizer will run with: tuned defaults, then the user's."""
    entry = get(name)
    defaults = dict(entry.defaults.get(model_family(model_name), {}))
    tuned_lr = defaults.pop("lr", 1e-3)
    if "fit" in options:
        tuned_lr = 1.0  # the fitted radii are the theorem's step sizes: lr multiplies them
    return (tuned_lr if lr is None else lr), {**defaults, **options}


def get(name: str) -> OptimizerEntry:
    """The entry for ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ValueError(
            f"Unknown optimizer {name!r}; expected one of {sorted(OPTIMIZERS)}"
        ) from None


def build(
    name: str, model: nn.Module, lr: float, options: dict[str, Any], parallel: str = "none"
) -> list[torch.optim.Optimizer]:
    """Build the optimizer(s) ``name`` for ``model`` under the lab's ``parallel`` mode.

    ``"ddp"``: Gluon optimizers run ``distributed="replicated"``; ``"fsdp2"``: the model's
    parameters are DTensors, and Gluon's ``"auto"`` is the sharded mode.
    """
    entry = get(name)
    opts = dict(options)
    if parallel == "ddp" and entry.gluon:
        opts["distributed"] = "replicated"
    return entry.build(model, lr, **opts)


def describe(optimizers: list[torch.optim.Optimizer]) -> str:
    """The parameter-group table: ``gluon_optim.describe`` for ours, a listing for peers."""
    parts = []
    for opt in optimizers:
        if isinstance(opt, go.Gluon):
            parts.append(go.describe(opt))
            continue
        lines = [f"{type(opt).__name__}:"]
        for i, g in enumerate(opt.param_groups):
            shapes = ", ".join("x".join(map(str, p.shape)) for p in g["params"])
            lines.append(f"  group {i}: lr={g['lr']} params=[{shapes}]")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)
