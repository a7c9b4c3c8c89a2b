"""Optimizer-step, orthogonalisation and training-step benchmarks (the "speed" part of the lab).

Three measurements, each taken in one process so that the ratios compare like with like:

* :func:`bench_step` times one ``optimizer.step()`` on the hidden matrices of a nanoGPT block
  stack (:func:`gpt_shapes`) for ``torch.optim.Muon`` (the reference), this library's Muon
  (Jordan and Polar Express coefficients) and Gluon spectral/RMS (Scion's hidden update),
  pytorch-optimizer's ``Muon`` and ``SCION``, HeavyBall's ``Muon`` and ``Scion`` (run eagerly:
  their ``torch.compile`` is switched off for the step, see :func:`_heavyball_eager`) and
  ``torch.optim.AdamW``. Next to the time it reports how close the first step's direction is to
  the exact polar factor (SVD) on Gaussian gradients (``polar_error``) and on gradients with a
  decaying spectrum ``sigma_i = 1/i`` (``polar_error_decay``, the harder, more realistic case),
  and how many bytes of optimizer state each parameter costs.
* :func:`bench_scaling` times :func:`~gluon_optim.polar.newton_schulz` and
  :func:`~gluon_optim.polar.polar_svd` on square ``n x n`` Gaussian matrices.
* :func:`bench_train` times whole training steps (forward, backward, optimizer step) of a lab
  GPT preset for optimizers of the lab registry (:mod:`gluon_optim.lab.optimizers`), in tokens
  per second, with the optimizer step's share of the step.

Run ``python -m gluon_optim.lab.bench --widths 256,384,768 --train --out DIR`` to write
``bench.json``, ``bench.md`` and ``scaling.png``. Peers that are not installed (HeavyBall,
pytorch-optimizer) are skipped and listed under "Notes" with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

import gluon_optim as go
from gluon_optim.lab import optimizers as optim_registry
from gluon_optim.lab.data import TokenDataset, load_data
from gluon_optim.lab.models import GPTConfig, build_model, model_config, model_task
from gluon_optim.lab.train import needs_closure, state_bytes
from gluon_optim.lowrank import rsvd
from gluon_optim.norms import shape_factor
from gluon_optim.polar import COMPILE_BACKENDS, newton_schulz, polar_svd, relative_error

__all__ = [
    "TRAIN_OPTIMIZERS",
    "bench_scaling",
    "bench_step",
    "bench_train",
    "format_scaling_table",
    "format_step_table",
    "format_train_table",
    "gpt_shapes",
    "main",
    "plot_scaling",
]

#: Optimizers that exist elsewhere but are not measured here, and why (filled by :func:`_entries`
#: from what is importable).
NOT_MEASURED: dict[str, str] = {}

#: The lab optimizers :func:`bench_train` compares by default (names of the lab registry).
TRAIN_OPTIMIZERS: tuple[str, ...] = ("adamw", "torch-muon", "muon", "muon-fast", "scion")

Factory = Callable[[list[nn.Parameter], float], Optimizer]


@dataclass(frozen=True)
class _Entry:
    """One benchmarked optimizer: how to build it and its spectral shape rule (None: no LMO)."""

    name: str
    factory: Factory
    shape_rule: str | None
    note: str = ""
    # The first step overwrites the parameters with an initialisation (heavyball.Scion), so the
    # first step's direction is measured against a twin stepped with lr=0.
    reinit_on_first_step: bool = False


def gpt_shapes(width: int, n_layer: int = 6) -> list[tuple[int, int]]:
    """The hidden weight matrices ``(d_out, d_in)`` of ``n_layer`` nanoGPT blocks at ``width``.

    Per layer: attention qkv ``(3w, w)``, attention projection ``(w, w)``, MLP fc ``(4w, w)``
    and MLP projection ``(w, 4w)`` (the ``nn.Linear`` weight layout, output first).
    """
    if width < 1 or n_layer < 1:
        raise ValueError(f"gpt_shapes: width and n_layer must be >= 1, got {width}, {n_layer}")
    w = width
    return [(3 * w, w), (w, w), (4 * w, w), (w, 4 * w)] * n_layer


# -- the optimizers ------------------------------------------------------------------------------


def _torch_muon(params: list[nn.Parameter], lr: float) -> Optimizer:
    return torch.optim.Muon(params, lr=lr, weight_decay=0.0, adjust_lr_fn="original")


def _go_muon(steps: int, **options: Any) -> Factory:
    def build(params: list[nn.Parameter], lr: float) -> Optimizer:
        return go.muon(params, lr=lr, ns_steps=steps, **options)

    return build


def _go_gluon_spectral(**options: Any) -> Factory:
    def build(params: list[nn.Parameter], lr: float) -> Optimizer:
        return go.Gluon(params, lr=lr, norm="spectral", momentum=0.9, **options)

    return build


FAST = go.presets.FAST_NS  # the fast recipe: Polar Express, Gram form where it is cheaper


def _pto_muon(params: list[nn.Parameter], lr: float) -> Optimizer:
    from pytorch_optimizer import Muon

    # pytorch-optimizer's Muon requires parameter groups carrying `use_muon`; a plain list of
    # tensors is rejected (see _pto_muon_plain_list_note).
    opt: Optimizer = Muon([{"params": params, "use_muon": True}], lr=lr, weight_decay=0.0)
    return opt


def _pto_scion(params: list[nn.Parameter], lr: float) -> Optimizer:
    from pytorch_optimizer import SCION
    from pytorch_optimizer.optimizer.scion import LMONorm

    # SCION's `momentum` is the weight of the NEW gradient (0.1 == beta 0.9); unconstrained,
    # spectral LMO with its default sqrt(d_out/d_in) scaling, radius 1.
    opt: Optimizer = SCION(
        params,
        lr=lr,
        momentum=0.1,
        constraint=False,
        norm_type=LMONorm.SPECTRAL,
        scale=1.0,
        weight_decay=0.0,
    )
    return opt


def _adamw(params: list[nn.Parameter], lr: float) -> Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def _pto_muon_plain_list_note() -> str:
    """Why pytorch-optimizer's Muon needs groups: try a plain list and record what it says."""
    from pytorch_optimizer import Muon

    p = nn.Parameter(torch.zeros(2, 2))
    try:
        Muon([p])
    except Exception as exc:  # noqa: BLE001 - we record whatever it raises
        return f"plain list rejected ({type(exc).__name__}: {exc}); run with use_muon=True group"
    return "accepts a plain list"


@contextlib.contextmanager
def _heavyball_eager() -> Iterator[None]:
    """Run HeavyBall without ``torch.compile`` inside the block.

    HeavyBall wraps its kernels in ``torch.compile`` (mode ``heavyball.utils.compile_mode``,
    ``"max-autotune-no-cudagraphs"``) and runs them eagerly when that setting is ``None``; the
    setting is read at every call, so it is set here for the step only and restored after, and
    other HeavyBall users in the process are unaffected. Why eager on a CPU: compilation costs
    more than the whole benchmark (the first Muon step on one width-256 block took about 14 s,
    and every new set of shapes compiles again), Inductor emits ``FutureWarning``s (errors in
    this project's tests), and the gain afterwards was small (one width-256 block on 2 cores:
    about 25 ms compiled against 30 ms eager per step).
    """
    hb_utils: Any = importlib.import_module("heavyball.utils")
    saved = hb_utils.compile_mode
    hb_utils.compile_mode = None
    try:
        yield
    finally:
        hb_utils.compile_mode = saved


def _heavyball(name: str, **options: Any) -> Factory:
    """A factory of ``heavyball.<name>`` whose ``step`` runs eagerly (:func:`_heavyball_eager`).

    ``compile_step=False`` as well (HeavyBall's default: no compiled chain around the step).
    """

    def build(params: list[nn.Parameter], lr: float) -> Optimizer:
        cls = getattr(importlib.import_module("heavyball"), name)
        opt: Optimizer = cls(params, lr=lr, weight_decay=0.0, compile_step=False, **options)
        heavyball_step = opt.step

        @functools.wraps(heavyball_step)
        def step(closure: Callable[[], float] | None = None) -> Any:
            with _heavyball_eager():
                return heavyball_step(closure)

        opt.step = step  # type: ignore[method-assign]
        return opt

    return build


_HB_EAGER = "eager (torch.compile off: heavyball.utils.compile_mode=None during step)"


def _heavyball_entries() -> list[_Entry]:
    """HeavyBall's Muon and Scion, configured as close to torch.optim.Muon / Scion as it allows.

    Muon: ``betas[0]=0.95`` with ``nesterov=True, heavyball_momentum=True``, i.e. ``v = 0.95 v +
    g`` and the update ``g + 0.95 v``, which is torch.optim.Muon's Nesterov momentum up to a
    positive factor that orthogonalisation removes (HeavyBall's default, ``heavyball_momentum=
    False``, is a different mix: ``g + EMA(g)``). HeavyBall has no NS coefficient or step option:
    5 steps of its own per-step coefficients on a stochastically rounded bf16 copy, and a
    ``sqrt(max(1, d_out/d_in))`` factor (shape rule ``muon``). Scion: EMA ``betas[0]=0.9`` with
    bias correction, spectral LMO times ``sqrt(d_out/d_in)`` (shape rule ``rms``), radius 1.
    """
    return [
        _Entry(
            "heavyball.Muon",
            _heavyball("Muon", betas=(0.95, 0.99), nesterov=True, heavyball_momentum=True),
            "muon",
            f"{_HB_EAGER}; nesterov + heavyball_momentum (torch.optim.Muon's momentum up to "
            "scale); its own 5 NS coefficients on a stochastically rounded bf16 copy",
        ),
        _Entry(
            "heavyball.Scion",
            _heavyball("Scion", betas=(0.9, 0.99), scale=1.0),
            "rms",
            f"{_HB_EAGER}; EMA 0.9 with bias correction; its first step overwrites the "
            "parameters with an orthogonal init x sqrt(d_out/d_in), so polar err is taken "
            "against an lr=0 twin",
            reinit_on_first_step=True,
        ),
    ]


def _entries(compile_backend: str = "") -> list[_Entry]:
    entries = [
        _Entry("torch.optim.Muon", _torch_muon, "muon", "reference; adjust_lr_fn='original'"),
        _Entry("go.muon jordan5", _go_muon(5), "muon", "default: torch's kernel"),
        _Entry("go.muon jordan5 gram", _go_muon(5, ns_form="auto"), "muon", "ns_form=auto"),
        _Entry("go.muon pe4 gram", _go_muon(4, **FAST), "muon", "4 steps: not equal accuracy"),
        _Entry("go.muon pe5", _go_muon(5, ns_preset="polar_express"), "muon"),
        _Entry("go.muon pe5 gram", _go_muon(5, **FAST), "muon", "the fast recipe"),
        _Entry(
            "go.muon pe5 gram foreach",
            _go_muon(5, foreach=True, **FAST),
            "muon",
            "+ foreach=True (stacked same-shape NS)",
        ),
        _Entry("go.muon pe6 gram", _go_muon(6, **FAST), "muon", "6 steps: HeavyBall-level"),
        _Entry("go.Gluon spectral/rms", _go_gluon_spectral(), "rms", "Scion hidden update"),
        _Entry(
            "go.Gluon spectral/rms pe5 gram",
            _go_gluon_spectral(**FAST),
            "rms",
            "Scion hidden update, fast recipe",
        ),
    ]
    if compile_backend:
        entries.append(
            _Entry(
                f"go.muon pe5 gram compile={compile_backend}",
                _go_muon(5, compile=compile_backend, **FAST),
                "muon",
                "torch.compile of Newton–Schulz; compile time is in the warm-up",
            )
        )
    try:
        import pytorch_optimizer  # noqa: F401
    except ImportError:
        NOT_MEASURED["pytorch_optimizer"] = "not installed"
    else:
        entries.append(
            _Entry("pto.Muon", _pto_muon, "muon", _pto_muon_plain_list_note()),
        )
        entries.append(_Entry("pto.SCION", _pto_scion, "rms", "momentum=0.1 (== beta 0.9)"))
    try:
        importlib.import_module("heavyball")
    except ImportError:
        NOT_MEASURED["heavyball"] = "not installed (pip install 'heavyball>=3.2', in the lab extra)"
    except Exception as exc:  # noqa: BLE001 - a broken install is skipped like a missing one
        NOT_MEASURED["heavyball"] = f"import failed ({type(exc).__name__}: {exc})"
    else:
        NOT_MEASURED.pop("heavyball", None)
        NOT_MEASURED["heavyball.MuonAdamW, MuonLaProp"] = (
            "MuonAdamW gives matrices heavyball.Muon's update (AdamW only on 1-D parameters); "
            "MuonLaProp orthogonalises a LaProp (Adam-normalised) update, a different method"
        )
        entries += _heavyball_entries()
    entries.append(_Entry("torch.optim.AdamW", _adamw, None, "elementwise baseline"))
    return entries


# -- measurement helpers -------------------------------------------------------------------------


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


def _first_step(entry: _Entry, grads: Sequence[Tensor], lr: float) -> list[Tensor]:
    params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    opt = entry.factory(params, lr)
    _set_grads(params, grads)
    opt.step()
    return [p.detach() for p in params]


def _direction_error(
    entry: _Entry, grads: Sequence[Tensor], polars: Sequence[Tensor], seed: int = 0
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


def _quartiles(times: Sequence[float]) -> tuple[float, float]:
    if len(times) < 2:
        return times[0], times[0]
    q = statistics.quantiles(times, n=4, method="inclusive")
    return q[0], q[2]


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - platform without getloadavg
        return None


def _meta(threads: int | None, **extra: Any) -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads() if threads is None else threads,
        "loadavg_start": _load(),
        **extra,
    }


# -- bench_step ----------------------------------------------------------------------------------


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
    entries = _entries(compile_backend)
    meta = _meta(threads, repeats=repeats, warmup=warmup, n_layer=n_layer, seed=seed)
    out: dict[str, Any] = {"meta": meta, "not_measured": dict(NOT_MEASURED), "widths": {}}
    for width in widths:
        shapes = gpt_shapes(width, n_layer)
        runs: list[tuple[_Entry, list[nn.Parameter], Optimizer, list[Tensor]]] = []
        grads: list[Tensor] = []
        for entry in entries:
            params, grads = _make_params(shapes, seed)
            opt = entry.factory(params, 1e-3)
            runs.append((entry, params, opt, grads))
        times: dict[str, list[float]] = {e.name: [] for e in entries}
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
        n_params = sum(d_out * d_in for d_out, d_in in shapes)
        decay = _decaying_spectrum(grads, seed)
        polars = [polar_svd(g) for g in grads]
        decay_polars = [polar_svd(g) for g in decay]
        rows: list[dict[str, Any]] = []
        for entry, _params, opt, g in runs:
            ts = times[entry.name]
            q1, q3 = _quartiles(ts)
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
        out["widths"][str(width)] = {
            "n_params": n_params,
            "n_matrices": len(shapes),
            "rows": rows,
        }
    meta["loadavg_end"] = _load()
    return out


def format_step_table(result: dict[str, Any]) -> str:
    """Markdown tables of a :func:`bench_step` result, one per width."""
    meta = result["meta"]
    lines = [
        f"Optimizer step, fp32 CPU, torch {meta['torch']}, threads {meta['threads']}, "
        f"median of {meta['repeats']} after {meta['warmup']} warm-up steps; "
        f"load average {meta.get('loadavg_start')} -> {meta.get('loadavg_end')}. "
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
            err = _fmt(r["polar_error"], ".4f")
            err_decay = _fmt(r.get("polar_error_decay"), ".4f")
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


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _first_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    blocks = list(result["widths"].values())
    return list(blocks[0]["rows"]) if blocks else []


# -- bench_scaling -------------------------------------------------------------------------------


def _scaling_methods() -> dict[str, tuple[int, Callable[[Tensor], Tensor]]]:
    """Name -> (aspect ratio r of the ``n x rn`` input, polar-factor function)."""

    def ns(preset: str, dtype: torch.dtype, form: str = "standard") -> Callable[[Tensor], Tensor]:
        return lambda g: newton_schulz(g, preset=preset, steps=5, dtype=dtype, form=form)

    return {
        "NS jordan5 bf16": (1, ns("jordan", torch.bfloat16)),
        "NS jordan5 fp32": (1, ns("jordan", torch.float32)),
        "NS polar_express5 bf16": (1, ns("polar_express", torch.bfloat16)),
        "NS polar_express5 fp32": (1, ns("polar_express", torch.float32)),
        "polar_svd fp32": (1, polar_svd),
        "NS polar_express5 bf16, n x 4n": (4, ns("polar_express", torch.bfloat16)),
        "NS polar_express5 bf16 gram, n x 4n": (4, ns("polar_express", torch.bfloat16, "gram")),
    }


def _median_ms(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def bench_scaling(
    sizes: Sequence[int] = (256, 512, 1024, 2048),
    *,
    repeats: int = 5,
    warmup: int = 1,
    threads: int | None = None,
    seed: int = 0,
    rsvd_n: int = 1024,
    ranks: Sequence[int] = (4, 8, 16, 32, 64, 128, 256),
) -> dict[str, Any]:
    """Median time (ms) of polar factors against matrix size, and of LiMuon's RSVD against rank.

    The first series are ``n x n`` Gaussian matrices (Newton–Schulz presets and the SVD), the
    last two ``n x 4n`` ones, the MLP shape, in the standard and the Gram form. The RSVD part
    times :func:`gluon_optim.lowrank.rsvd` (oversampling 5, what the ``storm_lowrank``
    estimator calls every step) on one ``rsvd_n x rsvd_n`` Gaussian matrix at each rank,
    next to 5 bf16 Polar Express steps and the full SVD of the same matrix.

    Returns:
        ``{"meta", "sizes", "series": {method: [ms per size]}, "rsvd": {"n", "ranks", "ms",
        "svd_ms", "ns_ms"}}`` (``rsvd`` is ``None`` when ``ranks`` is empty).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"bench_scaling: need repeats >= 1 and warmup >= 0, got {repeats}")
    if any(r < 1 for r in ranks) or rsvd_n < 1:
        raise ValueError(f"bench_scaling: ranks and rsvd_n must be >= 1, got {ranks}, {rsvd_n}")
    if threads is not None:
        torch.set_num_threads(threads)
    methods = _scaling_methods()
    meta = _meta(threads, repeats=repeats, warmup=warmup, seed=seed)
    series: dict[str, list[float]] = {name: [] for name in methods}
    gen = torch.Generator().manual_seed(seed)
    for n in sizes:
        inputs = {r: torch.randn(n, r * n, generator=gen) for r in {a for a, _ in methods.values()}}
        for name, (aspect, fn) in methods.items():
            g = inputs[aspect]
            series[name].append(_median_ms(lambda: fn(g), repeats, warmup))  # noqa: B023
    rsvd_block: dict[str, Any] | None = None
    if ranks:
        a = torch.randn(rsvd_n, rsvd_n, generator=gen)
        rsvd_block = {
            "n": rsvd_n,
            "ranks": list(ranks),
            "ms": [
                _median_ms(lambda: rsvd(a, r, oversampling=5, seed=seed), repeats, warmup)  # noqa: B023
                for r in ranks
            ],
            "svd_ms": _median_ms(lambda: torch.linalg.svd(a, full_matrices=False), repeats, warmup),
            "ns_ms": _median_ms(
                lambda: newton_schulz(a, preset="polar_express", steps=5), repeats, warmup
            ),
        }
    meta["loadavg_end"] = _load()
    return {"meta": meta, "sizes": list(sizes), "series": series, "rsvd": rsvd_block}


def format_scaling_table(result: dict[str, Any]) -> str:
    """A markdown table of a :func:`bench_scaling` result (median ms, one column per size)."""
    sizes = result["sizes"]
    meta = result["meta"]
    lines = [
        f"Polar factor of an n x n Gaussian matrix, CPU, threads {meta['threads']}, median of "
        f"{meta['repeats']} (ms); load average {meta.get('loadavg_start')} -> "
        f"{meta.get('loadavg_end')}",
        "",
        "| method | " + " | ".join(f"n={n}" for n in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
    ]
    for name, values in result["series"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    block = result.get("rsvd")
    if block:
        lines += [
            "",
            f"LiMuon's randomized SVD (oversampling 5) of one {block['n']} x {block['n']} Gaussian "
            f"matrix, median ms; for comparison full SVD {block['svd_ms']:.2f} ms, 5 bf16 Polar "
            f"Express steps {block['ns_ms']:.2f} ms",
            "",
            "| rank | " + " | ".join(str(r) for r in block["ranks"]) + " |",
            "|---|" + "---:|" * len(block["ranks"]),
            "| rsvd ms | " + " | ".join(f"{v:.2f}" for v in block["ms"]) + " |",
        ]
    return "\n".join(lines)


def plot_scaling(result: dict[str, Any], path: str | Path) -> Path:
    """Plot a :func:`bench_scaling` result as time vs ``n`` on log-log axes; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    block = result.get("rsvd")
    fig, axes = plt.subplots(1, 2 if block else 1, figsize=(12 if block else 6, 4.5))
    ax = axes[0] if block else axes
    for name, values in result["series"].items():
        style = "--" if "n x 4n" in name else "-"
        ax.plot(result["sizes"], values, style, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("n (matrix is n x n, or n x 4n where named)")
    ax.set_ylabel("median time (ms)")
    ax.set_title(f"Polar factor cost, CPU, {result['meta']['threads']} threads")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    if block:
        ax2 = axes[1]
        ax2.plot(block["ranks"], block["ms"], marker="o", label="rsvd (LiMuon storm_lowrank)")
        ax2.axhline(block["svd_ms"], color="gray", linestyle="--", label="full SVD")
        ax2.axhline(block["ns_ms"], color="tab:green", linestyle=":", label="NS pe5 bf16")
        ax2.set_xscale("log", base=2)
        ax2.set_yscale("log")
        ax2.set_xlabel("rank r")
        ax2.set_ylabel("median time (ms)")
        ax2.set_title(f"Randomized SVD of a {block['n']} x {block['n']} matrix")
        ax2.grid(True, which="both", alpha=0.3)
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- bench_train ---------------------------------------------------------------------------------


def _check_train_args(
    optimizers: Sequence[str],
    model: str,
    steps: int,
    warmup: int,
    batch_size: int,
    seq_len: int | None,
    threads: int | None,
) -> None:
    """``ValueError`` naming the first bad argument of :func:`bench_train`."""
    if isinstance(optimizers, str) or not optimizers:
        raise ValueError(
            f"bench_train: optimizers must be a non-empty list of names, got {optimizers!r}"
        )
    for name in optimizers:
        try:
            optim_registry.get(name)
        except ValueError as exc:
            raise ValueError(f"bench_train: optimizers: {exc}") from None
    if len(set(optimizers)) != len(optimizers):
        raise ValueError(f"bench_train: optimizers has duplicate names: {list(optimizers)}")
    try:
        task = model_task(model)
    except ValueError as exc:
        raise ValueError(f"bench_train: model: {exc}") from None
    if task != "lm":
        raise ValueError(f"bench_train: model must be a language-model preset, {model!r} is {task}")
    checks = [
        ("steps", steps, steps >= 1),
        ("warmup", warmup, warmup >= 0),
        ("batch_size", batch_size, batch_size >= 1),
        ("seq_len", seq_len, seq_len is None or seq_len >= 1),
        ("threads", threads, threads is None or threads >= 1),
    ]
    for name, value, ok in checks:
        if not ok:
            raise ValueError(f"bench_train: invalid {name}: {value!r}")


def _lm_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    logits = model(x)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


@dataclass
class _TrainRun:
    name: str
    lr: float
    model: nn.Module
    optimizers: list[Optimizer]
    two_point: bool
    step_ms: list[float]
    opt_ms: list[float]
    losses: list[float]


def bench_train(
    optimizers: Sequence[str] = TRAIN_OPTIMIZERS,
    *,
    model: str = "gpt-tiny",
    steps: int = 20,
    warmup: int = 3,
    batch_size: int = 16,
    seq_len: int | None = None,
    threads: int | None = None,
    seed: int = 0,
    data: str = "stdlib",
    data_cache: str | Path | None = None,
    model_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Time whole training steps of the lab's ``model`` for each lab optimizer, in one run.

    Everything comes from the lab's own builders: the data set (:func:`load_data`, ``data`` as
    on the command line), the model (:func:`build_model` with ``model_options`` as config
    overrides, seeded with ``seed`` so every optimizer starts from the same weights) and the
    optimizers (the lab registry, with their tuned lr and options for the model family). Each
    optimizer takes ``warmup`` untimed steps, then ``steps`` timed ones, round-robin across
    optimizers so background load hits them alike, on the batches a lab run with ``seed`` sees
    (one micro-batch, constant lr). A step is timed from ``zero_grad`` through forward, backward
    and every optimizer's ``step``; fetching the batch is outside. The optimizer part is timed
    separately except for exact two-point optimizers (``step(closure)`` evaluates the gradient
    itself), whose ``opt_*`` fields are ``None``.

    Args:
        optimizers: lab registry names (:data:`gluon_optim.lab.optimizers.OPTIMIZERS`).
        model: a language-model preset (``gpt-tiny``, ``gpt-small``, ...).
        steps, warmup: timed and untimed steps per optimizer.
        batch_size, seq_len: sequences per batch and tokens per sequence (``None``: the model's
            ``block_size``).
        threads: ``torch.set_num_threads`` (``None``: leave as is).

    Returns:
        ``{"meta": ..., "rows": [{"name", "lr", "median_ms", "q1_ms", "q3_ms", "tokens_per_s",
        "opt_median_ms", "opt_share", "state_bytes_per_param", "loss_first", "loss_last"},
        ...]}``; ``tokens_per_s`` is ``batch_size * seq_len`` over the median step time,
        ``opt_share`` the median optimizer time over the median step time.

    Raises:
        ValueError: naming the argument, for an unknown optimizer or model, a model that is not
            a language model, ``steps < 1``, ``warmup < 0``, ``batch_size < 1`` or a
            ``seq_len`` outside ``1..block_size``.
    """
    _check_train_args(optimizers, model, steps, warmup, batch_size, seq_len, threads)
    options = dict(model_options or {})
    config = model_config(model, **options)
    assert isinstance(config, GPTConfig)  # model_task(model) == "lm"
    if seq_len is None:
        seq_len = config.block_size
    elif seq_len > config.block_size:
        raise ValueError(
            f"bench_train: invalid seq_len: {seq_len} exceeds {model}'s block_size "
            f"{config.block_size}"
        )
    if threads is not None:
        torch.set_num_threads(threads)
    dataset = load_data(data, cache_dir=data_cache)
    if not isinstance(dataset, TokenDataset):
        raise ValueError(f"bench_train: data {data!r} is not a text data set")

    runs: list[_TrainRun] = []
    n_params = 0
    for name in optimizers:
        torch.manual_seed(seed)
        net = build_model(model, vocab_size=dataset.vocab_size, **options)
        n_params = sum(p.numel() for p in net.parameters())
        lr, opt_options = optim_registry.resolve(name, model, None, {})
        opts = optim_registry.build(name, net, lr, opt_options)
        net.train()
        runs.append(_TrainRun(name, lr, net, opts, needs_closure(opts), [], [], []))
    meta = _meta(
        threads,
        model=model,
        model_options=options,
        n_params=n_params,
        data=data,
        steps=steps,
        warmup=warmup,
        batch_size=batch_size,
        seq_len=seq_len,
        seed=seed,
    )

    for k in range(warmup + steps):
        x, y = dataset.batch("train", k, batch_size, seq_len, seed)
        for run in runs:
            t0 = time.perf_counter()
            t1 = _train_step(run, x, y)
            t2 = time.perf_counter()
            if k >= warmup:
                run.step_ms.append((t2 - t0) * 1e3)
                if t1 is not None:
                    run.opt_ms.append((t2 - t1) * 1e3)

    tokens = batch_size * seq_len
    rows: list[dict[str, Any]] = []
    for run in runs:
        median = statistics.median(run.step_ms)
        q1, q3 = _quartiles(run.step_ms)
        opt_median = statistics.median(run.opt_ms) if run.opt_ms else None
        rows.append(
            {
                "name": run.name,
                "lr": run.lr,
                "median_ms": median,
                "q1_ms": q1,
                "q3_ms": q3,
                "tokens_per_s": tokens / (median / 1e3),
                "opt_median_ms": opt_median,
                "opt_share": None if opt_median is None else opt_median / median,
                "state_bytes_per_param": state_bytes(run.optimizers) / n_params,
                "loss_first": run.losses[0],
                "loss_last": run.losses[-1],
            }
        )
    meta["loadavg_end"] = _load()
    return {"meta": meta, "rows": rows}


def _train_step(run: _TrainRun, x: Tensor, y: Tensor) -> float | None:
    """One training step of ``run``; returns when the optimizer part began (``None``: two-point)."""

    def closure() -> Tensor:
        for opt in run.optimizers:
            opt.zero_grad(set_to_none=True)
        loss = _lm_loss(run.model, x, y)
        loss.backward()  # type: ignore[no-untyped-call]
        return loss.detach()

    t1: float | None = None
    if run.two_point:
        loss: Any = run.optimizers[0].step(closure)  # type: ignore[arg-type]
    else:
        loss = closure()
        t1 = time.perf_counter()
        for opt in run.optimizers:
            opt.step()
    run.losses.append(float(loss))
    return t1


def format_train_table(result: dict[str, Any]) -> str:
    """A markdown table of a :func:`bench_train` result."""
    meta = result["meta"]
    lines = [
        f"Training step of {meta['model']} ({meta['n_params']:,} parameters) on {meta['data']}, "
        f"batch {meta['batch_size']} x {meta['seq_len']} tokens, fp32 CPU, torch {meta['torch']}, "
        f"threads {meta['threads']}, median of {meta['steps']} after {meta['warmup']} warm-up "
        f"steps; load average {meta.get('loadavg_start')} -> {meta.get('loadavg_end')}",
        "",
        "| optimizer | lr | step ms | IQR ms | tokens/s | opt step ms | opt share "
        "| state B/param | loss first -> last |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        share = "-" if r["opt_share"] is None else f"{100 * r['opt_share']:.0f}%"
        lines.append(
            f"| {r['name']} | {r['lr']:g} | {r['median_ms']:.2f} "
            f"| {r['q1_ms']:.2f}-{r['q3_ms']:.2f} | {r['tokens_per_s']:,.0f} "
            f"| {_fmt(r['opt_median_ms'], '.2f')} | {share} "
            f"| {r['state_bytes_per_param']:.1f} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} |"
        )
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _optimizer_names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in optim_registry.OPTIMIZERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown optimizer(s) {unknown or text!r}; expected names from "
            f"{', '.join(sorted(optim_registry.OPTIMIZERS))}"
        )
    return names


def _lm_model(name: str) -> str:
    try:
        task = model_task(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if task != "lm":
        raise argparse.ArgumentTypeError(f"{name!r} is an image model; --train needs a GPT preset")
    return name


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of :func:`main` (exposed so a CLI can embed it)."""
    p = argparse.ArgumentParser(
        prog="gluon-optim bench",
        description="Time optimizer steps on nanoGPT hidden matrices and polar-factor scaling.",
    )
    p.add_argument("--widths", type=_ints, default=[256, 384], help="e.g. 256,384,768")
    p.add_argument("--n-layer", type=int, default=6, help="blocks (default %(default)s)")
    p.add_argument("--repeats", type=int, default=10, help="timed steps (default %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--sizes",
        type=_ints,
        default=[256, 512, 1024, 2048],
        help="scaling sizes n; empty string skips the scaling benchmark",
    )
    p.add_argument(
        "--scaling-repeats", type=int, default=5, help="scaling repeats (default %(default)s)"
    )
    p.add_argument(
        "--train",
        action="store_true",
        help="also time whole training steps of a lab GPT (forward, backward, optimizer step)",
    )
    p.add_argument(
        "--train-optimizers",
        type=_optimizer_names,
        default=list(TRAIN_OPTIMIZERS),
        help="lab optimizer names for --train, comma-separated (default %(default)s)",
    )
    p.add_argument(
        "--train-model", type=_lm_model, default="gpt-tiny", help="GPT preset (default %(default)s)"
    )
    p.add_argument(
        "--train-steps", type=int, default=20, help="timed training steps (default %(default)s)"
    )
    p.add_argument(
        "--train-warmup", type=int, default=3, help="untimed training steps (default %(default)s)"
    )
    p.add_argument(
        "--train-batch-size", type=int, default=16, help="sequences per step (default %(default)s)"
    )
    p.add_argument("--train-data", default="stdlib", help="data spec (default %(default)s)")
    p.add_argument(
        "--compile",
        default="",
        choices=["", *COMPILE_BACKENDS],
        help="also time the fast Muon with torch.compile on this backend (e.g. inductor)",
    )
    p.add_argument("--out", type=Path, default=None, help="write bench.json, bench.md, scaling.png")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks, print the tables and optionally write them under ``--out``.

    The step benchmark always runs; the scaling one unless ``--sizes ''``; the training one
    with ``--train``. ``bench.json`` holds ``{"step", "scaling", "train"}`` (``null`` for a
    benchmark that did not run).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.train:  # fail before the step benchmark, not after it
        try:
            _check_train_args(
                args.train_optimizers,
                args.train_model,
                args.train_steps,
                args.train_warmup,
                args.train_batch_size,
                None,
                args.threads,
            )
        except ValueError as exc:
            parser.error(str(exc))
    step = bench_step(
        args.widths,
        repeats=args.repeats,
        warmup=args.warmup,
        n_layer=args.n_layer,
        threads=args.threads,
        seed=args.seed,
        compile_backend=args.compile,
    )
    text = format_step_table(step)
    print(text, flush=True)
    scaling: dict[str, Any] | None = None
    if args.sizes:
        scaling = bench_scaling(
            args.sizes, repeats=args.scaling_repeats, threads=args.threads, seed=args.seed
        )
        scaling_text = format_scaling_table(scaling)
        print("\n" + scaling_text, flush=True)
        text += "\n\n" + scaling_text
    train: dict[str, Any] | None = None
    if args.train:
        train = bench_train(
            args.train_optimizers,
            model=args.train_model,
            steps=args.train_steps,
            warmup=args.train_warmup,
            batch_size=args.train_batch_size,
            threads=args.threads,
            seed=args.seed,
            data=args.train_data,
        )
        train_text = format_train_table(train)
        print("\n" + train_text, flush=True)
        text += "\n\n" + train_text
    if args.out is not None:
        out: Path = args.out
        out.mkdir(parents=True, exist_ok=True)
        results = {"step": step, "scaling": scaling, "train": train}
        (out / "bench.json").write_text(json.dumps(results, indent=2))
        md = "# Benchmark\n\n" + text + "\n"
        if scaling is not None:
            plot_scaling(scaling, out / "scaling.png")
            md += "\n![scaling](scaling.png)\n"
        (out / "bench.md").write_text(md)
        print(f"\nwrote {out}/bench.json, bench.md" + (", scaling.png" if scaling else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
