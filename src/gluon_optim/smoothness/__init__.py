r"""Layer-wise (L0, L1)-smoothness along the training trajectory: probe, fit, theoretical radii.

Gluon's Assumption 1 (Riabinin et al., "Gluon: Making Muon & Scion Great Again!",
arXiv 2505.13416, Section 5) asks, for every layer ``i`` with its norm ``||.||_(i)`` and dual
norm ``||.||_(i)*``,

.. math::
    \|\nabla_i f(X) - \nabla_i f(Y)\|_{(i)*} \le
        \bigl(L_i^0 + L_i^1 \|\nabla_i f(X)\|_{(i)*}\bigr)\, \|X_i - Y_i\|_{(i)}

(norms, not squared norms). Under it, deterministic Gluon with the radius
``t_i = ||g_i||_* / (L0_i + L1_i ||g_i||_*)`` converges (Theorem 1); with ``L0_i ~ 0`` that radius
is the constant ``1/L1_i``. This package measures the constants on a real run, as the paper's
experiment code does, and turns them into optimizer settings. Its modules, each depending only
on those listed before it:

* :mod:`~gluon_optim.smoothness.fit`: :class:`Fit`, :func:`fit_l0_l1`, :func:`fit_records`, the
  paper's penalised least-squares fit of ``L_hat ~ L0 + L1 ||g||_*``, solved exactly; pure
  math on floats.
* :mod:`~gluon_optim.smoothness.io`: :func:`read_records` (the probe's JSONL), :func:`save_fits`
  / :func:`load_fits` (fits as JSON).
* :mod:`~gluon_optim.smoothness.probe`: :class:`SmoothnessProbe` and :class:`SmoothnessRecord`,
  hooks on a :class:`~gluon_optim.Gluon` that record, every ``every`` steps and for each LMO
  parameter, ``L_hat = ||g_{k+1} - g_k||_* / ||X^{k+1} - X^k||`` and ``||g_{k+1}||_*``
  without changing the numerics; the only module that touches tensors.
* :mod:`~gluon_optim.smoothness.displacement`: :class:`DisplacementProbe`, the controlled-
  displacement estimate (the same fixed batch at ``X`` and ``X + s d``), which separates the
  function's smoothness from minibatch noise; :func:`radius_dependence` and
  :func:`bootstrap_fit` (in ``fit``) say whether an ``L1`` scales like ``1/t`` and how well it
  is determined.
* :mod:`~gluon_optim.smoothness.radii`: :func:`theoretical_radii`, :func:`radius_settings`,
  :func:`compare_radii`, from fits to radii, to ``settings`` for :func:`gluon_optim.gluon` and
  to a comparison with a tuned configuration.

See ``docs/smoothness.md``.
"""

from gluon_optim.smoothness.displacement import DisplacementProbe, DisplacementRecord
from gluon_optim.smoothness.fit import (
    Fit,
    bootstrap_fit,
    fit_l0_l1,
    fit_records,
    radius_dependence,
)
from gluon_optim.smoothness.io import load_fits, read_records, save_fits
from gluon_optim.smoothness.probe import SmoothnessProbe, SmoothnessRecord
from gluon_optim.smoothness.radii import compare_radii, radius_settings, theoretical_radii

__all__ = [
    "DisplacementProbe",
    "DisplacementRecord",
    "Fit",
    "bootstrap_fit",
    "SmoothnessProbe",
    "SmoothnessRecord",
    "compare_radii",
    "fit_l0_l1",
    "fit_records",
    "load_fits",
    "radius_dependence",
    "radius_settings",
    "read_records",
    "save_fits",
    "theoretical_radii",
]
