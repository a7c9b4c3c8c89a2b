"""The optimizer-step benchmark: time, direction error and state of one ``step()``.

:func:`bench_step` times one ``optimizer.step()`` on the hidden matrices of a nanoGPT block
stack (:func:`gpt_shapes`) for this library's Muon (Jordan and Polar Express coefficients) and
Gluon spectral/RMS (Scion's hidden update) against the peers of :mod:`.peers`. Next to the time
it reports how close the first step's direction is to the exact polar factor (SVD) on Gaussian
gradients (``polar_error``) and on gradients with a decaying spectrum ``sigma_i = 1/i``
(``polar_error_decay``, the harder, more realistic case), and how many bytes of optimizer state
each parameter costs.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

import gluon_optim as go
from gluon_optim.lab.bench import peers
from gluon_optim.lab.bench.peers import Entry, Factory, Table
from gluon_optim.lab.bench.timing import conditions, fmt, load_average, machine_meta, quartiles
from gluon_optim.lab.train import state_bytes
from gluon_optim.norms import shape_factor
from gluon_optim.polar import COMPILE_BACKENDS, polar_svd, relative_error


def gpt_shapes(width: int, n_layer: int = 6) -> list[tuple[int, int]]:
    """The hidden weight matrices ``(d_out, d_in)`` of ``n_layer`` nanoGPT blocks at ``width``.

    Per layer: attention qkv ``(3w, w)``, attention projection ``(w, w)``, MLP fc ``(4w, w)``
    and MLP projection ``(w, 4w)`` (the ``nn.Linear`` weight layout, output first).
    """
    if width < 1 or n_layer < 1:
        raise ValueError(f"gpt_shapes: width and n_layer must be >= 1, got {width}, {n_layer}")
    w = width
    return [(3 * w, w), (w, w), (4 * w, w), (w, 4 * w)] * n_layer


# -- ours ----------------------------------------------------------------------------------------


def _go_muon(steps: int, **options: Any) -> Factory:
    def build(params: list[nn.Parameter], lr: float) -> Optimizer:
        return go.muon(params, lr=lr, ns_steps=steps, **options)

    return build


def _go_gluon_spectral(**options: Any) -> Factory:
    def build(params: list[nn.Parameter], lr: float) -> Optimizer:
        return go.Gluon(params, lr=lr, norm="spectral", momentum=0.9, **options)

    return build


def _ours(compile_backend: str) -> list[Entry]:
    fast = go.presets.FAST_NS  # the fast recipe: Polar Express, Gram form where it is cheaper
    entries = [
        Entry("go.muon jordan5", _go_muon(5), "muon", "default: torch's kernel"),
        Entry("go.muon jordan5 gram", _go_muon(5, ns_form="auto"), "muon", "ns_form=auto"),
        Entry("go.muon pe4 gram", _go_muon(4, **fast), "muon", "4 steps: not equal accuracy"),
        Entry("go.muon pe5", _go_muon(5, ns_preset="polar_express"), "muon"),
        Entry("go.muon pe5 gram", _go_muon(5, **fast), "muon", "the fast recipe"),
        Entry(
            "go.muon pe5 gram foreach",
            _go_muon(5, foreach=True, **fast),
            "muon",
            "+ foreach=True (stacked same-shape NS)",
        ),
        Entry("go.muon pe6 gram", _go_muon(6, **fast), "muon", "6 steps: HeavyBall-level"),
        Entry("go.Gluon spectral/rms", _go_gluon_spectral(), "rms", "Scion hidden update"),
        Entry(
            "go.Gluon spectral/rms pe5 gram",
            _go_gluon_spectral(**fast),
            "rms",
            "Scion hidden update, fast recipe",
        ),
    ]
    if compile_backend:
        entries.append(
            Entry(
                f"go.muon pe5 gram compile={compile_backend}",
                _go_muon(5, compile=compile_backend, **fast),
                "muon",
                "torch.compile of Newton–Schulz; compile time is in the warm-up",
            )
        )
    return entries


def contenders(compile_backend: str = "") -> Table:
    """What :func:`bench_step` measures: ``torch.optim.Muon``, ours, the peers, AdamW.

    Built on each call, so an optional peer installed (or hidden) since is seen as it is now.
    """
    return peers.table(_ours(compile_backend))


# -- inputs and the direction error --------------------------------------------------------------


def _make_params(
    shapes: Sequence[tuple[int, int]], seed: int
) -> tuple[list[nn.Parameter], list[Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(*s, generator=gen) / math.sqrt(s[1])) for s in shapes]
    grads = [torch.randn(*s, generator=gen) for s in shapes]
    return params, grads


def _set_grads(params: Sequence[nn.Parameter], grads: Sequence[Tensor]) -> None:
    for p, g in zip(params, grads, strict=True):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


def _decaying_spectrum(grads: Sequence[Tensor], seed: int) -> list[Tensor]:
    """Matrices ``U diag(1/i) V^T`` with the shapes and Frobenius norms of ``grads``.

    ``i = 1..min(m, n)``; ``U`` (``m x r``) and ``V`` (``n x r``) have orthonormal columns, the
    Q factors of seeded Gaussian matrices. Their condition number is ``min(m, n)``: a harder
    input for Newton–Schulz than a Gaussian matrix, and closer to real gradients' spectra.
    """
    # A stream of its own, so these never share draws with _make_params's.
    gen = torch.Generator().manual_seed(seed + 7919)
    out = []
    for g in grads:
        m, n = g.shape
        r = min(m, n)
        u = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=g.dtype)).Q
        v = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=g.dtype)).Q
        sigma = 1.0 / torch.arange(1, r + 1, dtype=g.dtype)
        d = (u * sigma) @ v.T
        out.append(d * (g.norm() / d.norm()))
    return out


def _first_step(entry: Entry, grads: Sequence[Tensor], lr: float) -> list[Tensor]:
    params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    opt = entry.factory(params, lr)
    _set_grads(params, grads)
    opt.step()
    return [p.detach() for p in params]


def _direction_error(
    entry: Entry, grads: Sequence[Tensor], polars: Sequence[Tensor], seed: int = 0
) -> float | None:
    """Mean relative Frobenius error of the first step's direction against ``polars``.

    ``polars[i]`` is ``polar_svd(grads[i])``. From zero parameters and fresh (zero) momentum with
    ``lr=1`` and no weight decay, every LMO optimizer here moves to ``-c * P(m)`` where ``m`` is
    a positive multiple of ``g`` (EMA: ``(1-beta) g``, or ``g`` with bias correction; Nesterov:
    ``g.lerp((1-beta) g, beta)`` or ``(1+beta) g``) and ``c`` is its shape factor, so ``-p / c``
    is its polar-factor estimate of ``g``. An optimizer whose first step re-initialises the
    parameters moves to ``init - c * P(m)``; a twin stepped with ``lr=0`` gives ``init``.
    The global RNG (HeavyBall rounds stochastically) is seeded and restored around the steps.
    """
    if entry.shape_rule is None:
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        moved = _first_step(entry, grads, 1.0)
        if entry.reinit_on_first_step:
            start = _first_step(entry, grads, 0.0)
            moved = [p - p0 for p, p0 in zip(moved, start, strict=True)]
    errors = []
    for p, g, polar in zip(moved, grads, polars, strict=True):
        c = shape_factor(entry.shape_rule, g.size(0), g.size(1))
        errors.append(relative_error(-p / c, polar))
    return statistics.fmean(errors)


# -- bench_step ----------------------------------------------------------------------------------

_Run = tuple[Entry, list[nn.Parameter], Optimizer, list[Tensor]]


def bench_step(
    widths: Sequence[int] = (256, 384),
    *,
    repeats: int = 10,
    warmup: int = 3,
    n_layer: int = 6,
    threads: int | None = None,
    seed: int = 0,
    compile_backend: str = "",
) -> dict[str, Any]:
    """Time one optimizer step per optimizer and width, all in this one run.

    For each width the fp32 parameters of :func:`gpt_shapes` get seeded random values and
    gradients. Every optimizer takes ``warmup`` untimed steps, then the optimizers take their
    ``repeats`` timed steps round-robin (so background load hits them alike); the same gradients
    are copied in before each step, outside the timed region. Times are wall-clock
    (:func:`time.perf_counter`) in milliseconds.

    Returns:
        ``{"meta": ..., "not_measured": ..., "widths": {str(w): {"n_params", "n_matrices",
        "rows": [{"name", "median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms", "ratio",
        "polar_error", "polar_error_decay", "state_bytes_per_param", "note"}, ...]}}}``;
        ``ratio`` is the median over ``torch.optim.Muon``'s median. ``polar_error`` is the first
        step's direction error (:func:`_direction_error`) on the Gaussian gradients,
        ``polar_error_decay`` on gradients of the same norms with singular values ``1/i``
        (:func:`_decaying_spectrum`); both are ``None`` for AdamW. ``compile_backend`` (e.g.
        ``"inductor"``) adds our fast Muon under ``torch.compile``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"bench_step: need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    if compile_backend not in ("", *COMPILE_BACKENDS):
        raise ValueError(
            f"bench_step: compile_backend must be '' or one of {list(COMPILE_BACKENDS)}, "
            f"got {compile_backend!r}"
        )
    if threads is not None:
        torch.set_num_threads(threads)
    table = contenders(compile_backend)
    meta = machine_meta(threads, repeats=repeats, warmup=warmup, n_layer=n_layer, seed=seed)
    out: dict[str, Any] = {"meta": meta, "not_measured": dict(table.not_measured), "widths": {}}
    for width in widths:
        shapes = gpt_shapes(width, n_layer)
        runs: list[_Run] = []
        for entry in table.entries:
            params, grads = _make_params(shapes, seed)
            runs.append((entry, params, entry.factory(params, 1e-3), grads))
        times = _time_steps(runs, repeats, warmup)
        n_params = sum(d_out * d_in for d_out, d_in in shapes)
        out["widths"][str(width)] = {
            "n_params": n_params,
            "n_matrices": len(shapes),
            "rows": _step_rows(runs, times, n_params, seed),
        }
    meta["loadavg_end"] = load_average()
    return out


def _time_steps(runs: Sequence[_Run], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Each run's timed steps (ms), taken round-robin after the untimed ones."""
    times: dict[str, list[float]] = {entry.name: [] for entry, *_ in runs}
    for _ in range(warmup):
        for _entry, params, opt, g in runs:
            _set_grads(params, g)
            opt.step()
    for _ in range(repeats):
        for entry, params, opt, g in runs:
            _set_grads(params, g)
            t0 = time.perf_counter()
            opt.step()
            times[entry.name].append((time.perf_counter() - t0) * 1e3)
    return times


def _step_rows(
    runs: Sequence[_Run], times: dict[str, list[float]], n_params: int, seed: int
) -> list[dict[str, Any]]:
    """The result rows of one width; every run was given the same seeded gradients."""
    grads = runs[-1][3]
    decay = _decaying_spectrum(grads, seed)
    polars = [polar_svd(g) for g in grads]
    decay_polars = [polar_svd(g) for g in decay]
    rows: list[dict[str, Any]] = []
    for entry, _params, opt, g in runs:
        ts = times[entry.name]
        q1, q3 = quartiles(ts)
        rows.append(
            {
                "name": entry.name,
                "median_ms": statistics.median(ts),
                "q1_ms": q1,
                "q3_ms": q3,
                "min_ms": min(ts),
                "max_ms": max(ts),
                "polar_error": _direction_error(entry, g, polars, seed),
                "polar_error_decay": _direction_error(entry, decay, decay_polars, seed),
                "state_bytes_per_param": state_bytes([opt]) / n_params,
                "note": entry.note,
            }
        )
    ref = rows[0]["median_ms"]
    for row in rows:
        row["ratio"] = 1.0 if row is rows[0] else row["median_ms"] / ref
    return rows


def format_step_table(result: dict[str, Any]) -> str:
    """Markdown tables of a :func:`bench_step` result, one per width."""
    meta = result["meta"]
    lines = [
        f"Optimizer step, {conditions(meta, meta['repeats'])}. "
        "polar err: first step's direction vs the SVD polar factor of Gaussian gradients; "
        "(decay): of gradients with singular values 1/i",
    ]
    for width, block in result["widths"].items():
        lines += [
            "",
            f"width {width}: {block['n_matrices']} matrices, {block['n_params']:,} parameters",
            "",
            "| optimizer | median ms | IQR ms | min-max ms | vs torch Muon | polar err "
            "| polar err (decay) | state B/param |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in block["rows"]:
            err = fmt(r["polar_error"], ".4f")
            err_decay = fmt(r.get("polar_error_decay"), ".4f")
            lines.append(
                f"| {r['name']} | {r['median_ms']:.2f} | {r['q1_ms']:.2f}-{r['q3_ms']:.2f} "
                f"| {r['min_ms']:.2f}-{r['max_ms']:.2f} | {r['ratio']:.2f} | {err} "
                f"| {err_decay} | {r['state_bytes_per_param']:.1f} |"
            )
    notes = [f"- {r['name']}: {r['note']}" for r in _first_rows(result) if r["note"]]
    notes += [f"- {name}: {why}" for name, why in result.get("not_measured", {}).items()]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines)


def _first_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    blocks = list(result["widths"].values())
    return list(blocks[0]["rows"]) if blocks else []
