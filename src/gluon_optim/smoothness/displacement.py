r"""Controlled-displacement smoothness: the same batch at ``X`` and at ``X + s d``.

The trajectory probe (:class:`~gluon_optim.smoothness.SmoothnessProbe`) compares the minibatch
gradients of two consecutive steps. Those are two different batches at points one step apart.
When consecutive minibatch gradients are nearly uncorrelated, the difference in the numerator
is mostly noise, whose size does not shrink with the step. The ratio is then about
``noise / t``, and the fitted ``L1`` is about ``c / t`` for whatever radius ``t`` the run
used: it measures the step size, not the function. This module removes both sources:

.. math::
    \hat L_i(s) = \frac{\|\nabla_i f_B(X + s\,d) - \nabla_i f_B(X)\|_{(i)*}}{\|s\, d_i\|_{(i)}},
    \qquad \|\nabla_i f_B(X)\|_{(i)*}

Here ``f_B`` is the loss of one FIXED batch ``B`` (the user's ``loss_fn``; a larger or full
batch brings ``f_B`` closer to ``f``). ``d`` has unit norm in every layer's own norm and
moves all layers at once, as a Gluon step does. ``s`` is a displacement chosen by the caller,
in absolute terms or as a multiple of each layer's radius ``t_i = lr * scale``.

``f_B`` is a deterministic function, so ``L_hat(s)`` reflects its curvature along ``d``. If
``L_hat`` stays level as ``s`` shrinks, it estimates a smoothness constant. If it grows like
``1/s``, the loss is not being evaluated deterministically (dropout, a different batch)
(:func:`~gluon_optim.smoothness.fit.radius_dependence` makes that test). This estimate goes
beyond the Gluon paper, whose experiment code uses the trajectory ratio only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypedDict

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from gluon_optim.optimizer import Gluon, resolve_norm
from gluon_optim.smoothness.probe import (
    _finiteness,
    _norm_values,
    _ratio,
    _unit_tensors,
    append_jsonl,
    param_entries,
)

__all__ = ["DisplacementProbe", "DisplacementRecord"]


class DisplacementRecord(TypedDict):
    """One parameter at one base point and one displacement.

    ``L_hat`` is the displacement ratio (module docstring), ``grad_dual`` the dual norm of the
    gradient at the base point, ``displacement`` the actual ``||X'_i - X_i||_(i)``, ``scale``
    the requested ``s`` (relative to ``t_i`` when ``relative`` is true).
    """

    step: int
    param: str
    role: str
    norm: str
    scale: float
    relative: bool
    displacement: float | None
    L_hat: float | None
    grad_dual: float | None
    note: str


class DisplacementProbe:
    r"""Measure ``L_hat(s)`` on a fixed batch every ``every`` steps, without changing the run.

    Args:
        optimizer: the :class:`~gluon_optim.Gluon` whose LMO parameters are probed (their
            norms and radii come from its groups).
        loss_fn: computes the loss of the fixed probe batch on the model, deterministically
            (no dropout, the same batch every call); the probe calls ``backward()`` on it.
        scales: the displacements ``s`` (each ``> 0``).
        every: measure after every ``every``-th ``step()``; ``0`` only when :meth:`measure`
            is called.
        relative: ``s`` in units of each layer's radius ``t_i = lr * scale`` (default), or
            in the norm's absolute units.
        direction: ``"lmo"`` (the layer's LMO of the gradient at ``X``, the direction a Gluon
            step takes) or ``"random"`` (Gaussian, seeded by ``seed``), scaled to unit norm.
        sink: a JSONL file that every record is appended to.
        start_step: the number of the first ``step()`` call (as :class:`SmoothnessProbe`).
        seed: seeds the random direction.

    After :meth:`measure` (and after a hooked step), every parameter holds its value from
    before, bit for bit, and every ``.grad`` is the same tensor object it was.
    """

    def __init__(
        self,
        optimizer: Gluon,
        loss_fn: Callable[[], Tensor],
        scales: Sequence[float] = (0.1, 0.3, 1.0, 3.0),
        every: int = 50,
        *,
        relative: bool = True,
        direction: Literal["lmo", "random"] = "lmo",
        sink: str | Path | None = None,
        start_step: int = 0,
        seed: int = 0,
    ) -> None:
        if not isinstance(optimizer, Gluon):
            raise TypeError(
                f"DisplacementProbe needs a gluon_optim.Gluon optimizer, got "
                f"{type(optimizer).__name__}"
            )
        if not callable(loss_fn):
            raise TypeError("DisplacementProbe: loss_fn must be a callable returning the loss")
        scales = tuple(scales)
        if not scales or not all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0
            for s in scales
        ):
            raise ValueError(f"DisplacementProbe: scales must be finite numbers > 0, got {scales}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"DisplacementProbe: every must be an int >= 0, got {every!r}")
        if direction not in ("lmo", "random"):
            raise ValueError(
                f"DisplacementProbe: direction must be 'lmo' or 'random', got {direction!r}"
            )
        self.optimizer, self.loss_fn = optimizer, loss_fn
        self.scales = tuple(float(s) for s in scales)
        self.every, self.relative, self.direction = every, bool(relative), direction
        self.sink = Path(sink) if sink is not None else None
        self.seed = seed
        self.records: list[DisplacementRecord] = []
        self._next = start_step
        self._sink_failed = False
        self._handles: list[RemovableHandle] = []
        if every:
            self._handles.append(optimizer.register_step_post_hook(self._post_hook))

    def remove(self) -> None:
        """Detach the hook; :attr:`records` stay. Safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _post_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        n = self._next
        self._next += 1
        if (n + 1) % self.every == 0:
            self.measure(step=n + 1)

    # -- the measurement ---------------------------------------------------------------------
    def _gradients(self, params: list[Tensor]) -> dict[int, Tensor | None]:
        for p in params:
            p.grad = None
        with torch.enable_grad():
            self.loss_fn().backward()  # type: ignore[no-untyped-call]
        return {id(p): None if p.grad is None else p.grad.detach().clone() for p in params}

    def _unit_direction(self, group: dict[str, Any], p: Tensor, g: Tensor) -> Tensor | None:
        norm = resolve_norm(group, p)
        view = (group["transposed"], group["blocks"])
        if self.direction == "lmo":
            raw = norm.restore(norm.lmo(norm.operand(g, *view)), p, *view)
        else:
            gen = torch.Generator(device=p.device).manual_seed(self.seed + p.numel())
            raw = torch.randn(p.shape, generator=gen, device=p.device, dtype=g.dtype)
        if group["blocks"] != "whole":
            # Every LMO unit is a layer: each is scaled to unit norm in its own norm (a unit
            # with a zero direction, an expert no token chose, stays where it is).
            units = norm.operand(raw.double(), *view)
            sizes = norm.norm(units)
            if not bool(torch.isfinite(sizes).all()) or not bool((sizes > 0).any()):
                return None
            scaled = units / torch.where(sizes > 0, sizes, 1.0)[..., None, None]
            return norm.restore(scaled, p, *view).to(raw.dtype)
        size = float(norm.norm_of(raw.double(), *view))
        if not (math.isfinite(size) and size > 0):
            return None
        return raw / size

    def measure(self, step: int = 0) -> list[DisplacementRecord]:
        """Take the measurements at the model's current point; return (and keep) the records."""
        entries = list(param_entries(self.optimizer))
        everything = [p for group in self.optimizer.param_groups for p in group["params"]]
        saved = [p.grad for p in everything]
        base = {id(p): p.detach().clone() for _, _, p in entries}
        records: list[DisplacementRecord] = []
        try:
            g0 = self._gradients(everything)
            units: dict[int, Tensor | None] = {}
            for _, group, p in entries:
                g = g0[id(p)]
                units[id(p)] = None if g is None else self._unit_direction(group, p, g)
            for s in self.scales:
                with torch.no_grad():
                    for _, group, p in entries:
                        unit = units[id(p)]
                        radius = float(group["lr"]) * group["scale"]
                        size = s * radius if self.relative else s
                        if unit is not None and size > 0:
                            p.add_(unit.to(p.dtype), alpha=size)
                g1 = self._gradients(everything)
                with torch.no_grad():
                    for key, group, p in entries:
                        records += self._records(step, s, key, group, p, base, g0, g1)
                    for _, _, p in entries:
                        p.copy_(base[id(p)])
        finally:
            with torch.no_grad():
                for _, _, p in entries:
                    p.copy_(base[id(p)])
                for p, g in zip(everything, saved, strict=True):
                    p.grad = g
        self.records.extend(records)
        if self.sink is not None and not self._sink_failed and records:
            self._sink_failed = not append_jsonl(self.sink, records, "DisplacementProbe")
        return records

    def _records(
        self,
        step: int,
        s: float,
        key: str,
        group: dict[str, Any],
        p: Tensor,
        base: dict[int, Tensor],
        g0: dict[int, Tensor | None],
        g1: dict[int, Tensor | None],
    ) -> list[DisplacementRecord]:
        """One record, or one per LMO unit (``key[u]``) of a parameter with ``blocks``."""
        a, b = g0.get(id(p)), g1.get(id(p))
        dx = p.detach().double() - base[id(p)].double()
        if group["blocks"] == "whole" or a is None or b is None:
            view = (group["transposed"], "whole")
            return [self._record(step, s, key, group, p, (dx, a, b), view)]
        norm = resolve_norm(group, p)
        units = (_unit_tensors(norm, t, group) for t in (dx, a, b))
        return [
            self._record(step, s, f"{key}[{u}]", group, p, parts, (False, "whole"))
            for u, parts in enumerate(zip(*units, strict=True))
        ]

    def _record(
        self,
        step: int,
        s: float,
        key: str,
        group: dict[str, Any],
        p: Tensor,
        tensors: tuple[Tensor, Tensor | None, Tensor | None],
        view: tuple[bool, str],
    ) -> DisplacementRecord:
        norm = resolve_norm(group, p)
        rec: DisplacementRecord = {
            "step": step,
            "param": key,
            "role": str(group.get("role", "")),
            "norm": norm.name,
            "scale": s,
            "relative": self.relative,
            "displacement": None,
            "L_hat": None,
            "grad_dual": None,
            "note": "",
        }
        dx, a, b = tensors
        if a is None or b is None:
            rec["note"] = "no gradient"
            return rec
        ok, notes = _finiteness(step, dx, b, a)
        # grad_dual is read from the last argument: the gradient at the base point X.
        values = _norm_values(norm, view, dx, b, a, ok)
        rec["displacement"] = values.get("update_norm")
        rec["grad_dual"] = values.get("grad_dual")
        rec["L_hat"], why = _ratio(values.get("dgrad_dual"), values.get("update_norm"))
        rec["note"] = "; ".join([*notes, why] if why else notes)
        return rec
