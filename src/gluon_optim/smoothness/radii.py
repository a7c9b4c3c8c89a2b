r"""From fitted (L0, L1) constants to radii: Theorem 1's radius, optimizer settings, comparison.

Under layer-wise (L0, L1)-smoothness (Riabinin et al., "Gluon: Making Muon & Scion Great
Again!", arXiv 2505.13416, Assumption 1 and Section 5), deterministic Gluon with the radius

.. math::
    t_i = \frac{\|g_i\|_{(i)*}}{L_i^0 + L_i^1 \|g_i\|_{(i)*}}

converges (Theorem 1). With ``L0_i ~ 0``, the paper's finding, it is the constant ``1/L1_i``;
with a larger ``L0`` it is smaller for small gradients and ``1/L1`` is its limit for large
ones. :func:`theoretical_radii` gives ``1/L1``, :func:`radius_settings` the group settings of
the optimizer's ``l0l1`` radius policy (``t = lr * scale * ||g||_* / (L0 + L1 ||g||_*)``), and
:func:`compare_radii` sets the theory next to a configured optimizer's radii.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from torch import Tensor

from gluon_optim.optimizer import Gluon
from gluon_optim.smoothness.fit import Fit
from gluon_optim.smoothness.probe import param_entries

__all__ = ["compare_radii", "radius_settings", "theoretical_radii"]


def theoretical_radii(fits: Mapping[str, Fit]) -> dict[str, float]:
    r"""``1 / L1`` for every fit that has an ``L1 > 0``.

    With ``L0 ~ 0`` (the paper's finding) Theorem 1's radius
    ``t = ||g||_* / (L0 + L1 ||g||_*)`` is the constant ``1 / L1``; with a larger ``L0`` it is
    smaller for small gradients and ``1 / L1`` is its limit for large ones.
    """
    return {k: 1.0 / f.l1 for k, f in fits.items() if f.l1 is not None and f.l1 > 0.0}


def radius_settings(
    fits: Mapping[str, Fit],
    by: Literal["role", "param"] = "role",
    *,
    skip_missing: bool = False,
) -> dict[str, dict[str, Any]]:
    """Group settings for the ``l0l1`` radius policy: Gluon's Theorem 1 with fitted constants.

    ``by="role"`` returns ``{role: {"radius_policy": "l0l1", "l0": L0, "l1": L1, "scale": 1}}``,
    ready for ``go.gluon(model, lr=1.0, settings=...)``: the optimizer's radius is
    ``t = lr * scale * ||g||_* / (L0 + L1 ||g||_*)``, so ``lr = scale = 1`` is the theorem
    (an LR schedule then multiplies it). When several fits share a role (per-parameter fits)
    the role takes the largest ``L0`` and the largest ``L1``: one radius for the group that the
    assumption allows for every layer in it. Fits made by role map one to one.
    ``by="param"`` keys the same dicts by fit name, for groups of one parameter each.

    Raises ``ValueError`` naming the fits without constants (too little data), unless
    ``skip_missing=True`` drops them; a role left out keeps its preset's constant radius
    ``lr * scale``, which with ``lr = 1`` is almost surely too large. Keep ``L0`` at the fit's
    lower bound rather than 0: ``L0 = 0`` with a zero gradient makes ``0 / 0``.
    """
    if by not in ("role", "param"):
        raise ValueError(f"radius_settings: by must be 'role' or 'param', got {by!r}")
    missing = [k for k, f in fits.items() if f.l0 is None or f.l1 is None]
    if missing and not skip_missing:
        raise ValueError(
            f"radius_settings: fit(s) {missing} have no constants ({fits[missing[0]].note}); "
            "measure more steps or pass skip_missing=True"
        )
    if not fits or len(missing) == len(fits):
        raise ValueError(
            "radius_settings: no fit has constants (an empty probe or fits file?); empty "
            "settings would leave every layer at its preset's radius lr * scale"
        )
    constants: dict[str, tuple[float, float]] = {}
    for key, fit in fits.items():
        if fit.l0 is None or fit.l1 is None:
            continue
        name = key if by == "param" else fit.role or key
        if by == "role" and not name:
            raise ValueError(f"radius_settings: fit {key!r} has no role; use by='param'")
        l0, l1 = constants.get(name, (fit.l0, fit.l1))
        constants[name] = (max(l0, fit.l0), max(l1, fit.l1))
    return {
        name: {"radius_policy": "l0l1", "l0": l0, "l1": l1, "scale": 1.0}
        for name, (l0, l1) in constants.items()
    }


def compare_radii(fits: Mapping[str, Fit], optimizer: Gluon) -> list[dict[str, Any]]:
    """Theoretical radius ``1/L1`` against a configuration's radius, one row per LMO parameter.

    Each row: ``param``, ``role``, ``l0``, ``l1``, ``theory_radius`` (``1/L1``), ``policy`` (the
    group's ``radius``), ``radius`` (``lr * scale`` for a ``constant`` group, else ``None``) and
    ``ratio = radius / theory_radius`` (the paper's tuned/theory: 0.018 / 0.014 ~ 1.3 for the
    NanoGPT blocks). A parameter's fit is looked up by its name (as the probe names it), then
    by its group's role; ``None`` marks what is unknown.
    """
    rows: list[dict[str, Any]] = []
    for key, group, _ in param_entries(optimizer):
        role = str(group.get("role", ""))
        fit = fits.get(key) or (fits.get(role) if role else None)
        l1 = fit.l1 if fit is not None else None
        theory = 1.0 / l1 if l1 is not None and l1 > 0.0 else None
        lr = group["lr"]
        lr_f = float(lr.item()) if isinstance(lr, Tensor) else float(lr)
        radius = lr_f * float(group["scale"]) if group["radius_policy"] == "constant" else None
        rows.append(
            {
                "param": key,
                "role": role,
                "l0": fit.l0 if fit is not None else None,
                "l1": l1,
                "theory_radius": theory,
                "policy": group["radius_policy"],
                "radius": radius,
                "ratio": radius / theory if radius is not None and theory else None,
            }
        )
    return rows
