"""gluon-optim: layer-wise LMO optimizers (Gluon, with Muon and Scion as presets).

Quick start::

    import gluon_optim as go
    opt = go.scion(model, lr=0.00036, constrained=False)   # unconstrained Scion
    opt = go.muon(model, lr=0.02)                          # Muon + AdamW, one optimizer
    print(go.describe(opt))                                # what happens to each parameter
"""

from gluon_optim import norms, polar
from gluon_optim.optimizer import DEFAULTS, Gluon, describe, resolve_norm
from gluon_optim.presets import PRESETS, gluon, muon, param_groups, preset_table, scion, unscion
from gluon_optim.roles import ROLES, Assignment, assign_roles

__version__ = "0.1.0"

__all__ = [
    "DEFAULTS",
    "PRESETS",
    "ROLES",
    "Assignment",
    "Gluon",
    "assign_roles",
    "describe",
    "gluon",
    "muon",
    "norms",
    "param_groups",
    "polar",
    "preset_table",
    "resolve_norm",
    "scion",
    "unscion",
]
