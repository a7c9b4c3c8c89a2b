"""gluon-optim: layer-wise LMO optimizers (Gluon, with Muon and Scion as presets).

Quick start::

    import gluon_optim as go
    opt = go.scion(model, lr=0.00036, constrained=False)   # unconstrained Scion
    opt = go.muon(model, lr=0.02)                          # Muon + AdamW, one optimizer
    opt = go.limuon(model, rank=8, lr=0.02)                # LiMuon; then opt.step(closure)
    print(go.describe(opt))                                # what happens to each parameter
"""

from gluon_optim import estimators, groups, lowrank, norms, polar, radius, smoothness
from gluon_optim.groups import DEFAULTS
from gluon_optim.integrations import unwrap
from gluon_optim.optimizer import Gluon, describe, resolve_norm
from gluon_optim.presets import (
    FAST_NS,
    PRESETS,
    gluon,
    gluon_mvr,
    limuon,
    muon,
    param_groups,
    preset_table,
    scion,
    unscion,
)
from gluon_optim.roles import ROLES, Assignment, RoleKey, assign_roles, unwrap_model

__version__ = "0.2.0"

__all__ = [
    "DEFAULTS",
    "FAST_NS",
    "PRESETS",
    "ROLES",
    "Assignment",
    "Gluon",
    "RoleKey",
    "assign_roles",
    "describe",
    "estimators",
    "groups",
    "gluon",
    "gluon_mvr",
    "limuon",
    "lowrank",
    "muon",
    "norms",
    "param_groups",
    "polar",
    "preset_table",
    "radius",
    "resolve_norm",
    "scion",
    "smoothness",
    "unscion",
    "unwrap",
    "unwrap_model",
]
