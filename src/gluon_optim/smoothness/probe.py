r"""The trajectory-smoothness probe: measure each layer's ``L_hat`` along a Gluon run.

Layer-wise (L0, L1)-smoothness (Riabinin et al., "Gluon: Making Muon & Scion Great Again!",
arXiv 2505.13416, Assumption 1 and Section 5) bounds the change of each layer's gradient, in the
layer's dual norm, by ``(L0_i + L1_i ||grad_i f(X)||_(i)*)`` times the layer's step in its own
norm. :class:`SmoothnessProbe` measures that ratio along a real run, as the paper's experiment
code does: it attaches to a :class:`~gluon_optim.Gluon` through its step hooks and, every
``every`` steps, records for each LMO parameter and two consecutive steps ``(k, k + 1)``

.. math::
    \hat L_i = \frac{\|g_i^{k+1} - g_i^k\|_{(i)*}}{\|X_i^{k+1} - X_i^k\|_{(i)}},\qquad
    \|g_i^{k+1}\|_{(i)*}

with raw minibatch gradients ``g`` and the layer's own norm pair. Plotted against each other,
these points are what :func:`~gluon_optim.smoothness.fit_l0_l1` fits. The probe never changes
the numerics. Its norms are the optimizer's own, through public API only:
:func:`~gluon_optim.optimizer.resolve_norm` picks a parameter's norm and
:meth:`~gluon_optim.norms.Norm.dual_of` / :meth:`~gluon_optim.norms.Norm.norm_of` read the
parameter as that norm's operand (flattened conv kernels, transposed embeddings).
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NotRequired, TypedDict, cast

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.utils.hooks import RemovableHandle

from gluon_optim.distributed import ReplicatedExecutor
from gluon_optim.norms import Norm, Spectral, SpectralConv
from gluon_optim.optimizer import Gluon, resolve_norm

__all__ = ["SmoothnessProbe", "SmoothnessRecord", "param_entries"]

# torch.linalg.LinAlgError (a RuntimeError) is what a non-converging SVD raises; typeshed-style
# stubs do not re-export it, hence getattr.
_LinAlgError: type[Exception] = getattr(torch.linalg, "LinAlgError", RuntimeError)


class SmoothnessRecord(TypedDict):
    """One measurement of one parameter: the pair of steps ``(k, k + 1)``, ``step = k + 1``.

    Every float is finite or ``None`` (JSON ``null``); ``note`` says why a value is missing.
    ``L_hat_euclid`` and ``grad_fro`` are present when the probe runs with ``euclidean=True``.
    """

    step: int
    param: str
    role: str
    norm: str
    L_hat: float | None
    grad_dual: float | None
    update_norm: float | None
    L_hat_euclid: NotRequired[float | None]
    grad_fro: NotRequired[float | None]
    note: str


def param_entries(optimizer: Gluon) -> Iterator[tuple[str, dict[str, Any], Tensor]]:
    """``(key, group, p)`` for every parameter of an LMO group, in ``state_dict`` order.

    The key is the name from the group's ``param_names`` when it has them, else
    ``params[j]`` with ``j`` the parameter's position over all groups (the integer id
    ``state_dict()`` gives it), which is unique where the optimizer's own group-local
    ``params[i]`` is not.
    """
    j = 0
    for group in optimizer.param_groups:
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            key = str(names[i]) if names else f"params[{j}]"
            j += 1
            if group["algorithm"] == "lmo":
                yield key, group, p


@dataclass
class _First:
    """The first point of a pair: ``X^k`` copied before step ``k``, ``g_k`` after it."""

    step: int
    params: dict[int, Tensor]
    grads: dict[int, Tensor | None] | None = None


@dataclass
class _Second:
    """A pair waiting for ``g_{k+1}``: ``dX = X^{k+1} - X^k`` and ``g_k``."""

    step: int
    updates: dict[int, Tensor]
    grads: dict[int, Tensor | None]


def _unit_tensors(norm: Norm, t: Tensor, group: Mapping[str, Any]) -> tuple[Tensor, ...]:
    """The LMO units of a parameter-shaped ``t`` under ``group``'s ``blocks``, each a
    ``(d_out, d_in)`` view, in order (expert by expert, then block by block)."""
    op = norm.operand(t, group["transposed"], group["blocks"])
    return op.reshape(-1, *op.shape[-2:]).unbind(0)


def _wide(t: Tensor) -> torch.dtype:
    # Differences of bfloat16/float16 tensors are taken in float32 (a difference of two
    # nearby half-precision numbers is exact there, not in half precision); float64 stays.
    return torch.promote_types(t.dtype, torch.float32)


class SmoothnessProbe:
    r"""Measure layer-wise trajectory smoothness during training, without changing it.

    Every ``every`` optimizer steps the probe measures the pair of consecutive steps
    ``(k, k + 1)`` with ``(k + 1) % every == 0`` (with ``every=50``: steps 49 -> 50, 99 -> 100,
    ..., the cadence of the paper's NanoGPT code), and records for each parameter ``X_i`` of an
    LMO group, with the norm pair of its group (:func:`~gluon_optim.resolve_norm`, applied to the
    operand the optimizer uses: conv kernels as the norm sees them, embeddings transposed):

    .. math::
        \hat L_i = \frac{\|g_i^{k+1} - g_i^k\|_{(i)*}}{\|X_i^{k+1} - X_i^k\|_{(i)}},\qquad
        \text{grad\_dual} = \|g_i^{k+1}\|_{(i)*},\qquad
        \text{update\_norm} = \|X_i^{k+1} - X_i^k\|_{(i)}

    where ``g^k = p.grad`` is the raw minibatch gradient of step ``k`` (a different batch at each
    step, never the momentum), exactly what the optimizer received. With ``euclidean=True`` the
    Frobenius versions ``L_hat_euclid = ||dg||_F / ||dX||_F`` and ``grad_fro = ||g^{k+1}||_F`` are
    recorded too. A batched norm (``bias_rms`` on a matrix) sums its dual norms and takes the
    largest primal norm: the dual pair of the product of per-row balls.

    When the values are taken, through ``register_step_pre_hook`` / ``register_step_post_hook``:
    ``X^k`` before step ``k`` (parameters not yet moved), ``g^k`` after step ``k`` (``.grad``
    holds the gradient that step used, also when ``step(closure)`` computed it inside the step;
    the optimizer never writes ``.grad``), ``X^{k+1}`` before step ``k + 1`` and ``g^{k+1}`` after
    it. Copies exist only from the start of step ``k`` to the end of step ``k + 1``: two per
    LMO parameter (four around a step when ``every=1``), in the parameter's dtype, float32 for
    half-precision differences. Everything runs under ``torch.no_grad()`` on copies, reads no
    random numbers and writes nothing the optimizer reads: parameters, gradients and state are
    bit-identical with and without the probe.

    Never crashes a run, never writes NaN: a zero update (``||dX|| = 0``: a frozen layer, lr 0,
    a skipped step) or a non-finite value gives ``None`` and a ``note``; a parameter without a
    gradient at either step is recorded with ``None`` values and a note; a step that raised
    drops the pair it belonged to; a sink that cannot be written warns once and the records stay
    in :attr:`records`. AdamW groups (``algorithm="adamw"``) have no norm and are skipped.

    Args:
        optimizer: the :class:`~gluon_optim.Gluon` to watch.
        every: measure the pair ``(k, k + 1)`` whenever ``(k + 1) % every == 0``.
        euclidean: also record the Frobenius-norm versions.
        exact_dual: compute the dual of spectral norms (``spectral``, ``spectral_conv``) with
            an exact SVD (the nuclear norm) instead of the group's own polar method. The
            default, like the paper's code, uses ``-<dG, lmo(dG)>`` with the optimizer's LMO
            (Newton–Schulz in bfloat16: cheap, and the dual norm that LMO implies, but it
            under-weights small singular values); the SVD is the clean estimate and costs
            ``O(m n min(m, n))`` per matrix and measurement.
        sink: a JSONL file; every record is appended as one line as soon as it is measured
            (a resumed run continues the same file). Write from one rank only under DDP.
        start_step: the step number of the optimizer's next step (for a probe attached to a
            resumed run, so that ``step`` and the cadence follow the run's count).

    Attributes:
        records: every :class:`SmoothnessRecord` so far, in measurement order.
    """

    def __init__(
        self,
        optimizer: Gluon,
        every: int = 50,
        *,
        euclidean: bool = True,
        exact_dual: bool = False,
        sink: str | Path | None = None,
        start_step: int = 0,
    ) -> None:
        if not isinstance(optimizer, Gluon):
            raise TypeError(
                f"SmoothnessProbe needs a gluon_optim.Gluon optimizer, got "
                f"{type(optimizer).__name__}; the layer norms come from its groups"
            )
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"SmoothnessProbe: every must be an int >= 1, got {every!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"SmoothnessProbe: start_step must be an int >= 0, got {start_step!r}")
        self.optimizer = optimizer
        self.every = every
        self.euclidean = bool(euclidean)
        self.exact_dual = bool(exact_dual)
        self.sink = Path(sink) if sink is not None else None
        self.records: list[SmoothnessRecord] = []
        self._next = start_step  # the number of the next step() call
        self._current = -1  # the step between a pre-hook and its post-hook
        self._first: _First | None = None
        self._second: _Second | None = None
        self._sink_failed = False
        self._handles: list[RemovableHandle] = [
            optimizer.register_step_pre_hook(self._pre_hook),
            optimizer.register_step_post_hook(self._post_hook),
        ]

    # -- lifecycle --------------------------------------------------------------------------------
    def remove(self) -> None:
        """Detach the hooks and free every copy; :attr:`records` stay. Safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._first = None
        self._second = None

    def __enter__(self) -> SmoothnessProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- hooks ------------------------------------------------------------------------------------
    def _pre_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        n = self._next
        self._next += 1
        self._current = n
        # A pair still waiting for its second gradient belongs to a step that raised before its
        # post-hook: drop it.
        self._second = None
        with torch.no_grad():
            first = self._first
            self._first = None
            if first is not None and first.step == n - 1 and first.grads is not None:
                updates: dict[int, Tensor] = {}
                for _, _, p in param_entries(self.optimizer):
                    x0 = first.params.get(id(p))
                    if x0 is not None:
                        dt = _wide(p)
                        updates[id(p)] = p.detach().to(dt) - x0.to(dt)
                first.params = {}  # X^k is no longer needed once dX exists
                self._second = _Second(first.step, updates, first.grads)
            if (n + 1) % self.every == 0:
                self._first = _First(
                    n,
                    {
                        id(p): p.detach().clone(memory_format=torch.preserve_format)
                        for _, _, p in param_entries(self.optimizer)
                    },
                )

    def _post_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        n = self._current
        with torch.no_grad():
            entries = list(param_entries(self.optimizer))
            # .grad now holds g_n, the gradient this step used (the optimizer never writes it).
            # The pair that ends here reads it in place; only the pair that starts here keeps a
            # copy, because the next backward pass will overwrite or free it.
            now: dict[int, Tensor | None] = {id(p): p.grad for _, _, p in entries}
            second, self._second = self._second, None
            if second is not None and second.step == n - 1:
                self._emit(self._measure_all(second, now, entries))
            if self._first is not None and self._first.step == n:
                self._first.grads = {
                    i: None if g is None else g.detach().clone(memory_format=torch.preserve_format)
                    for i, g in now.items()
                }

    # -- one measurement --------------------------------------------------------------------------
    def _measure_all(
        self,
        pair: _Second,
        grads: Mapping[int, Tensor | None],
        entries: list[tuple[str, dict[str, Any], Tensor]],
    ) -> list[SmoothnessRecord]:
        """Every layer's record. Under ``distributed="replicated"`` or ``"sharded"`` each layer
        is measured once, by the rank that owns its LMO, on whole tensors (under ``"sharded"``
        from ``DTensor.full_tensor``, which every rank calls for every layer, in the same
        order); one ``all_gather_object`` then gives every rank every record, in order."""
        executor = self.optimizer.executor
        if not isinstance(executor, ReplicatedExecutor):
            return [r for key, g, p in entries for r in self._measure(pair, grads, key, g, p)]
        owners = executor.plan().owners
        position = {
            id(p): (gi, pi)
            for gi, group in enumerate(self.optimizer.param_groups)
            for pi, p in enumerate(group["params"])
        }

        def whole(t: Tensor | None) -> Tensor | None:
            return t.full_tensor() if isinstance(t, DTensor) else t

        mine: list[tuple[int, int, SmoothnessRecord]] = []
        for i, (key, group, p) in enumerate(entries):
            one = _Second(
                pair.step,
                {} if (dx := whole(pair.updates.get(id(p)))) is None else {id(p): dx},
                {id(p): whole(pair.grads.get(id(p)))},
            )
            g1 = whole(grads.get(id(p)))
            if owners[position[id(p)]] == executor.rank:
                records = self._measure(one, {id(p): g1}, key, group, p)
                mine += [(i, u, r) for u, r in enumerate(records)]
        gathered: list[Any] = [None] * executor.world
        dist.all_gather_object(gathered, mine, group=executor.process_group)
        merged = sorted((r for part in gathered for r in part), key=lambda r: r[:2])
        return [record for _, _, record in merged]

    def _norm(self, group: Mapping[str, Any], p: Tensor) -> Norm:
        norm = resolve_norm(group, p)
        if self.exact_dual and isinstance(norm, (Spectral, SpectralConv)):
            norm = dataclasses.replace(norm, method="svd")
        return norm

    def _measure(
        self,
        pair: _Second,
        grads: Mapping[int, Tensor | None],
        key: str,
        group: dict[str, Any],
        p: Tensor,
    ) -> list[SmoothnessRecord]:
        """The records of one parameter: one, or one per LMO unit of a blocked parameter.

        Gluon's layer is the LMO unit, so each expert (or block) of a parameter with
        ``blocks`` is a layer of its own here, keyed ``name[u]`` with ``u`` its index in the
        units' view flattened in order (:mod:`gluon_optim.blocks`).
        """
        dx, g0, g1 = pair.updates.get(id(p)), pair.grads.get(id(p)), grads.get(id(p))
        if group["blocks"] == "whole":
            view = (group["transposed"], "whole")
            return [self._measure_one(pair.step, key, group, p, (dx, g0, g1), view)]
        norm = self._norm(group, p)
        count = math.prod(norm.operand_shape(p.shape, group["transposed"], group["blocks"])[:-2])

        def units(t: Tensor | None) -> list[Tensor | None]:
            return [None] * count if t is None else list(_unit_tensors(norm, t, group))

        parts = zip(units(dx), units(g0), units(g1), strict=True)
        return [
            self._measure_one(pair.step, f"{key}[{u}]", group, p, tensors, (False, "whole"))
            for u, tensors in enumerate(parts)
        ]

    def _measure_one(
        self,
        k: int,
        key: str,
        group: dict[str, Any],
        p: Tensor,
        tensors: tuple[Tensor | None, Tensor | None, Tensor | None],
        view: tuple[bool, str],
    ) -> SmoothnessRecord:
        """One layer's record from ``(dX, g_k, g_{k+1})``; ``view`` is how ``norm`` reads
        them (a unit of a blocked parameter is already a ``(d_out, d_in)`` matrix)."""
        norm = self._norm(group, p)
        rec = _empty_record(k + 1, key, str(group.get("role", "")), norm.name, self.euclidean)
        dx, g0, g1 = tensors
        missing = (
            (dx, f"not in the optimizer at step {k}"),
            (g0, f"no gradient at step {k}"),
            (g1, f"no gradient at step {k + 1}"),
        )
        notes = [why for t, why in missing if t is None]
        if dx is None or g0 is None or g1 is None:
            return _finish(rec, notes)
        ok, bad = _finiteness(k, dx, g0, g1)
        notes += bad
        try:
            got = _norm_values(norm, view, dx, g0, g1, ok)
        except _LinAlgError as err:  # an SVD that did not converge
            return _finish(rec, [*notes, f"norm computation failed: {err}"])

        rec["grad_dual"] = _finite(got.get("grad_dual"))
        rec["update_norm"] = _finite(got.get("update_norm"))
        rec["L_hat"], why = _ratio(got.get("dgrad_dual"), got.get("update_norm"))
        if why:
            notes.append(why)
        if self.euclidean:
            rec["grad_fro"] = _finite(got.get("grad_fro"))
            rec["L_hat_euclid"], why_fro = _ratio(got.get("dgrad_fro"), got.get("update_fro"))
            if why_fro and why_fro != why:
                notes.append(f"Frobenius: {why_fro}")
        return _finish(rec, notes)

    def _emit(self, records: list[SmoothnessRecord]) -> None:
        self.records.extend(records)
        if self.sink is not None and not self._sink_failed and records:
            self._sink_failed = not append_jsonl(self.sink, records, "SmoothnessProbe")


def append_jsonl(sink: Path, records: Sequence[Mapping[str, Any]], who: str) -> bool:
    """Append one JSON line per record to ``sink``; ``False`` (and one warning) if it failed.

    A full disk must not end a long training run: the caller keeps its records in memory and
    stops writing.
    """
    lines = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records)
    try:
        sink.parent.mkdir(parents=True, exist_ok=True)
        with sink.open("a", encoding="utf-8") as fh:
            fh.write(lines)
    except OSError as err:
        warnings.warn(
            f"{who}: cannot write {sink} ({err}); records are kept in probe.records only from "
            "now on",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def _empty_record(step: int, key: str, role: str, norm: str, euclidean: bool) -> SmoothnessRecord:
    """A record of one parameter with every value still ``None``."""
    rec: SmoothnessRecord = {
        "step": step,
        "param": key,
        "role": role,
        "norm": norm,
        "L_hat": None,
        "grad_dual": None,
        "update_norm": None,
        "note": "",
    }
    if euclidean:
        rec["L_hat_euclid"] = None
        rec["grad_fro"] = None
    return rec


def _finiteness(k: int, dx: Tensor, g0: Tensor, g1: Tensor) -> tuple[list[bool], list[str]]:
    """Whether ``dX``, ``g^k``, ``g^{k+1}`` are finite (one host synchronisation); why not."""
    ok: list[bool] = torch.stack([torch.isfinite(t).all() for t in (dx, g0, g1)]).tolist()
    whys = (
        f"non-finite update X^{k + 1} - X^{k}",
        f"non-finite gradient at step {k}",
        f"non-finite gradient at step {k + 1}",
    )
    return ok, [why for good, why in zip(ok, whys, strict=True) if not good]


def _norm_values(
    norm: Norm, view: tuple[bool, str], dx: Tensor, g0: Tensor, g1: Tensor, ok: Sequence[bool]
) -> dict[str, float]:
    """The norms of one measurement, in one host synchronisation.

    ``grad_dual`` / ``grad_fro`` of ``g^{k+1}``, ``update_norm`` / ``update_fro`` of ``dX`` and
    ``dgrad_dual`` / ``dgrad_fro`` of ``g^{k+1} - g^k``, each only when the tensors it reads
    are finite (``ok``, as :func:`_finiteness` gives it): an SVD of a NaN matrix may raise
    instead of returning NaN. A non-converging SVD raises.
    """
    ok_dx, ok_g0, ok_g1 = ok
    dt = _wide(g1)
    g1w = g1.to(dt)
    dg = g1w - g0.to(dt)
    values: dict[str, Tensor] = {}
    if ok_g1:
        values["grad_dual"] = norm.dual_of(g1w, *view)
        values["grad_fro"] = torch.linalg.vector_norm(g1w)
    if ok_dx:
        values["update_norm"] = norm.norm_of(dx, *view)
        values["update_fro"] = torch.linalg.vector_norm(dx)
    if ok_g0 and ok_g1:
        values["dgrad_dual"] = norm.dual_of(dg, *view)
        values["dgrad_fro"] = torch.linalg.vector_norm(dg)
    if not values:
        return {}
    flat = torch.stack([v.double() for v in values.values()]).tolist()
    return dict(zip(values, flat, strict=True))


def _finish(rec: SmoothnessRecord, notes: list[str]) -> SmoothnessRecord:
    """``rec`` with its note, keys in the documented order (the note last) for readable JSONL."""
    keys = ["step", "param", "role", "norm", "L_hat", "grad_dual", "update_norm"]
    if "L_hat_euclid" in rec:
        keys += ["L_hat_euclid", "grad_fro"]
    out: dict[str, Any] = {key: rec.get(key) for key in keys}
    out["note"] = "; ".join(notes)
    return cast(SmoothnessRecord, out)


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _ratio(num: float | None, den: float | None) -> tuple[float | None, str]:
    """``num / den`` when it is a finite number, else ``None`` and the reason."""
    if num is None or den is None:
        return None, ""
    if not (math.isfinite(num) and math.isfinite(den)):
        return None, "non-finite norm"
    if den == 0.0:
        return None, "zero update ||X^(k+1) - X^k|| = 0 (frozen layer, lr 0 or a skipped step)"
    r = num / den
    if not math.isfinite(r):
        return None, "ratio overflows (update too small)"
    return r, ""
