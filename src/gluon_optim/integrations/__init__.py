"""Glue for the training frameworks people already use; each submodule imports its framework.

* :mod:`gluon_optim.integrations.hf`: Hugging Face ``Trainer`` (``optimizer_cls_and_kwargs``
  and :class:`~gluon_optim.integrations.hf.GluonTrainer`, which runs exact two-point MVR).
* :mod:`gluon_optim.integrations.lightning`: a Lightning callback that refuses the
  combinations that would make an exact two-point step silently wrong.
* :func:`unwrap` (here, no framework needed): the :class:`~gluon_optim.Gluon` inside a
  framework's optimizer wrapper (accelerate's ``AcceleratedOptimizer``, Lightning's
  ``LightningOptimizer``), to reach ``previous_iterate()``, ``needs_closure()``,
  ``in_previous_iterate`` and ``state_bytes()``.

The core never imports this package.
"""

from __future__ import annotations

from typing import Any

from gluon_optim.optimizer import Gluon

__all__ = ["lmo_group_index", "unwrap"]

#: Attributes under which wrappers keep the optimizer they wrap, in the order tried.
_WRAPPED = ("optimizer", "_optimizer")


def unwrap(optimizer: Any) -> Gluon:
    """The :class:`~gluon_optim.Gluon` inside ``optimizer`` (itself, if it is one).

    Follows ``.optimizer`` (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``) and ``._optimizer`` through any number of wrappers.

    Raises:
        TypeError: no Gluon optimizer is inside.
    """
    seen: list[str] = []
    current = optimizer
    for _ in range(16):  # a cycle of wrappers would otherwise loop forever
        if isinstance(current, Gluon):
            return current
        seen.append(type(current).__name__)
        inner = next((getattr(current, a) for a in _WRAPPED if hasattr(current, a)), None)
        if inner is None or inner is current:
            break
        current = inner
    raise TypeError(f"no gluon_optim.Gluon inside {' -> '.join(seen)}")


def lmo_group_index(optimizer: Any) -> int:
    """The index of the first LMO group: the group whose ``lr`` a logger should report.

    A preset puts embeddings first, and under ``muon`` those are AdamW groups, so the first
    group's lr is not the one that drives the matrices. 0 when there is no LMO group.
    """
    groups = unwrap(optimizer).param_groups
    return next((i for i, g in enumerate(groups) if g["algorithm"] == "lmo"), 0)
