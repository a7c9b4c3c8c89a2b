"""The two-point gradient protocol: ``g_k(X^{k-1})``, the current batch at the previous iterate.

Variance-reduced estimators correct their momentum with ``g_k(X^k) - g_k(X^{k-1})``: the SAME
batch ``xi_k`` at two points. In ``two_point="exact"`` mode the optimizer keeps ``X^{k-1}``
(state key ``prev_param``) and obtains the second gradient in one of two ways:

* ``opt.step(closure)``: the step calls the closure at ``X^{k-1}`` first (parameters swapped in,
  every ``.grad`` set aside), copies out the gradients it leaves, restores ``X^k`` bit for bit
  and every ``.grad``, then calls it at ``X^k``;
* ``with opt.previous_iterate(): loss.backward()`` before ``opt.step()``: the block's gradients
  are kept as ``prev_point_grad`` until the step consumes them.

In ``two_point="approx"`` mode the previous step's gradient ``g_{k-1}(X^{k-1})`` stands in
(state key ``prev_grad``): one gradient per step, and no protocol beyond remembering it.

This module owns those three state keys: it writes them, consumes them and says which a group
keeps (:func:`state_keys`); nothing else in the package touches them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from gluon_optim.estimators import ESTIMATORS

__all__ = ["TWO_POINT_KEYS", "TwoPoint", "Work", "kept_keys", "needs_partner", "state_keys"]

#: Every state key of the protocol (``state_bytes()`` counts them as two-point memory).
TWO_POINT_KEYS = frozenset({"prev_param", "prev_grad", "prev_point_grad"})

# The collected step: every group with its (parameter, gradient) pairs.
Work = list[tuple[dict[str, Any], list[tuple[Tensor, Tensor]]]]


def needs_partner(group: Mapping[str, Any]) -> bool:
    """Whether the group's estimator needs ``g_prev`` at all (either mode)."""
    return group["algorithm"] == "lmo" and ESTIMATORS[group["estimator"]].two_point


def is_exact(group: Mapping[str, Any]) -> bool:
    """Whether the group's step needs ``g_k(X^{k-1})``: a VR estimator in exact mode."""
    return needs_partner(group) and group["two_point"] == "exact"


def state_keys(group: Mapping[str, Any]) -> tuple[str, ...]:
    """The protocol's state keys a parameter of ``group`` keeps between steps."""
    if not needs_partner(group):
        return ()
    return ("prev_param", "prev_point_grad") if group["two_point"] == "exact" else ("prev_grad",)


def kept_keys(group: Mapping[str, Any]) -> tuple[str, ...]:
    """The protocol's keys every step of ``group`` leaves (the partner of the next step).

    ``prev_point_grad`` is not among them: it lives only between a :meth:`TwoPoint.block` and
    the step that consumes it.
    """
    if not needs_partner(group):
        return ()
    return ("prev_param",) if group["two_point"] == "exact" else ("prev_grad",)


def _name(group: Mapping[str, Any], i: int) -> str:
    names = group.get("param_names")
    return str(names[i]) if names else f"params[{i}]"


class TwoPoint:
    """The protocol for one optimizer: reads and writes only its own state keys."""

    def __init__(self, optimizer: Optimizer) -> None:
        self._opt = optimizer
        #: True while parameters hold ``X^{k-1}`` (a closure's first call, a block's body).
        self.active = False

    # -- which parameters ----------------------------------------------------------------------
    def targets(self, work: Work | None = None) -> list[Tensor]:
        """Parameters whose next step needs ``g_k(X^{k-1})`` (with a gradient, if ``work``).

        A parameter's first step has no previous iterate, so it is no target.
        """
        if work is None:
            pairs = [(group, group["params"]) for group in self._opt.param_groups]
        else:
            pairs = [(group, [p for p, _ in items]) for group, items in work]
        out: list[Tensor] = []
        for group, params in pairs:
            if not is_exact(group):
                continue
            estimator = ESTIMATORS[group["estimator"]]
            for p in params:
                state = self._opt.state.get(p)
                # A step count of 0: placeholders made up front, not a previous iterate.
                if (
                    state
                    and "prev_param" in state
                    and ("step" not in state or float(state["step"]) > 0)
                    and estimator.ready(state)
                ):
                    out.append(p)
        return out

    # -- obtaining the gradient ------------------------------------------------------------------
    @contextlib.contextmanager
    def at_previous_iterate(
        self, params: list[Tensor], start: Mapping[int, Tensor]
    ) -> Iterator[dict[int, Tensor]]:
        """Swap ``params`` to their stored ``X^{k-1}``; yield a dict filled on a clean exit.

        On entry every ``.grad`` of the optimizer is set aside (``params`` start from a copy of
        ``start`` where given, so repeated blocks accumulate); on a clean exit the dict maps
        ``id(p)`` to a copy of the gradient computed in the block. Always: ``X^k`` is restored
        bit for bit and every ``.grad`` is put back as found.
        """
        everything = [p for group in self._opt.param_groups for p in group["params"]]
        saved = [p.grad for p in everything]
        current = [p.detach().clone(memory_format=torch.preserve_format) for p in params]
        found: dict[int, Tensor] = {}
        try:
            with torch.no_grad():
                for p in everything:
                    p.grad = None
                for p in params:
                    p.copy_(self._opt.state[p]["prev_param"])
                    if id(p) in start:
                        p.grad = start[id(p)].clone(memory_format=torch.preserve_format)
            self.active = True
            yield found
            self.active = False
            # Copied, not taken over: gradient storage may be reused by the next backward pass
            # (DDP's gradient_as_bucket_view, user hooks), and the state must not alias it.
            for p in params:
                if p.grad is not None:
                    found[id(p)] = p.grad.clone(memory_format=torch.preserve_format)
        finally:
            self.active = False
            with torch.no_grad():
                for p, x in zip(params, current, strict=True):
                    p.copy_(x)
                for p, g in zip(everything, saved, strict=True):
                    p.grad = g

    @contextlib.contextmanager
    def block(self) -> Iterator[None]:
        """The body of :meth:`Gluon.previous_iterate`: keep the block's gradients as pending."""
        params = self.targets()
        pending = {
            id(p): self._opt.state[p]["prev_point_grad"]
            for p in params
            if "prev_point_grad" in self._opt.state[p]
        }
        with self.at_previous_iterate(params, pending) as found:
            yield
        for p in params:
            if id(p) in found:
                self._opt.state[p]["prev_point_grad"] = found[id(p)]

    def run_closure(self, closure: Callable[[], Any]) -> tuple[Any, dict[int, Tensor] | None]:
        """Call ``closure`` at ``X^{k-1}`` (if any parameter needs it), then at ``X^k``.

        Evaluating the previous point first means ``.grad`` never has to be saved across a
        backward pass, which breaks when gradient storage is reused (DDP's
        ``gradient_as_bucket_view``). Returns the last call's loss and the gradients at
        ``X^{k-1}`` (``None`` when no parameter needed them).
        """
        found: dict[int, Tensor] | None = None
        targets = self.targets()
        if targets:
            with self.at_previous_iterate(targets, {}) as found:
                with torch.enable_grad():
                    closure()
        with torch.enable_grad():
            loss = closure()
        return loss, found

    def gradients(self, work: Work, from_closure: dict[int, Tensor] | None) -> dict[int, Tensor]:
        """``g_k(X^{k-1})`` for every parameter whose update needs it, keyed by ``id(p)``.

        ``from_closure`` holds what the closure produced; without one the gradients must have
        been left by a :meth:`block`. Raises ``RuntimeError`` (having changed nothing) when a
        needed gradient is missing.
        """
        params = self.targets(work)
        if not params:
            return {}
        if from_closure is not None:
            found = from_closure
        else:
            found = {
                id(p): self._opt.state[p]["prev_point_grad"]
                for p in params
                if "prev_point_grad" in self._opt.state[p]
            }
        missing = {id(p) for p in params if id(p) not in found}
        if missing:
            raise self._missing(work, missing, from_closure is not None)
        return found

    @staticmethod
    def _missing(work: Work, missing: set[int], closure: bool) -> RuntimeError:
        groups: list[str] = []
        names: list[str] = []
        for index, (group, _) in enumerate(work):
            lost = [_name(group, i) for i, p in enumerate(group["params"]) if id(p) in missing]
            if lost:
                role = f", role {group['role']!r}" if group.get("role") else ""
                groups.append(f"{index} (estimator {group['estimator']!r}{role})")
                names += lost
        if closure:
            return RuntimeError(
                f"Gluon.step(closure): the closure's call at the previous iterate produced no "
                f"gradient for parameter(s) {names} of param group(s) {', '.join(groups)} "
                "(two_point='exact'); nothing was changed. The closure must compute the loss of "
                "the same batch and call backward() each time it is called."
            )
        return RuntimeError(
            f"Gluon.step(): param group(s) {', '.join(groups)} use a variance-reduced estimator "
            "with two_point='exact', which needs the gradient of the CURRENT batch at the "
            f"PREVIOUS iterate, and none was given for parameter(s) {names}; nothing was "
            "changed. Either pass a closure, opt.step(closure), that zeroes the gradients, "
            "computes the loss of the batch and calls backward() (the optimizer calls it at "
            "X^k and again at X^(k-1)); or compute that gradient inside "
            "`with opt.previous_iterate(): loss_fn(model(x), y).backward()` before calling "
            "opt.step(); or set two_point='approx' (one gradient per step: the previous "
            "step's gradient stands in for it)."
        )

    # -- per parameter, inside the step ----------------------------------------------------------
    @staticmethod
    def partner(
        state: Mapping[str, Any], group: Mapping[str, Any], at_previous: Tensor | None
    ) -> Tensor | None:
        """``g_prev`` of one parameter: the gradient at ``X^{k-1}`` or the previous gradient."""
        return at_previous if group["two_point"] == "exact" else state.get("prev_grad")

    @staticmethod
    def remember(
        state: MutableMapping[str, Any], p: Tensor, g: Tensor, group: Mapping[str, Any]
    ) -> None:
        """Before ``p`` changes, keep what the next step needs: ``X^k`` or ``g_k(X^k)``.

        Copied out of ``p`` / ``p.grad`` in ``p``'s dtype, into the same buffer every step.
        """
        key, source = ("prev_param", p) if group["two_point"] == "exact" else ("prev_grad", g)
        if key in state:
            state[key].copy_(source)
        else:
            state[key] = source.detach().clone(memory_format=torch.preserve_format)

    def finish(self) -> None:
        """After a step: a gradient left by a block belonged to this step, used or not."""
        for group in self._opt.param_groups:
            if is_exact(group):
                for p in group["params"]:
                    state = self._opt.state.get(p)
                    if state:
                        state.pop("prev_point_grad", None)
