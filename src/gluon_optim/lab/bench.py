"""Optimizer-step and orthogonalisation benchmarks (the "speed" part of the lab).

Two measurements, each taken in one process so that the ratios compare like with like:

* :func:`bench_step` times one ``optimizer.step()`` on the hidden matrices of a nanoGPT block
  stack (:func:`gpt_shapes`) for ``torch.optim.Muon`` (the reference), this library's Muon
  (Jordan and Polar Express coefficients) and Gluon spectral/RMS (Scion's hidden update),
  pytorch-optimizer's ``Muon`` and ``SCION``, and ``torch.optim.AdamW``. Next to the time it
  reports how close the first step's direction is to the exact polar factor (SVD) and how many
  bytes of optimizer state each parameter costs.
* :func:`bench_scaling` times :func:`~gluon_optim.polar.newton_schulz` and
  :func:`~gluon_optim.polar.polar_svd` on square ``n x n`` Gaussian matrices.

Run ``python -m gluon_optim.lab.bench --widths 256,384,768 --out DIR`` to write ``bench.json``,
``bench.md`` and ``scaling.png``. HeavyBall is not measured (not installed here).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

import gluon_optim as go
from gluon_optim.lab.train import state_bytes
from gluon_optim.norms import shape_factor
from gluon_optim.polar import newton_schulz, polar_svd, relative_error

__all__ = [
    "bench_scaling",
    "bench_step",
    "format_scaling_table",
    "format_step_table",
    "gpt_shapes",
    "main",
    "plot_scaling",
]

#: Optimizers that exist elsewhere but are not measured here, and why.
NOT_MEASURED: dict[str, str] = {
    "heavyball": "not installed in this environment (no HeavyBall Muon/Scion timings)",
}

Factory = Callable[[list[nn.Parameter], float], Optimizer]


@dataclass(frozen=True)
class _Entry:
    """One benchmarked optimizer: how to build it and its spectral shape rule (None: no LMO)."""

    name: str
    factory: Factory
    shape_rule: str | None
    note: str = ""


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


def _go_muon(preset: str, steps: int) -> Factory:
    def build(params: list[nn.Parameter], lr: float) -> Optimizer:
        return go.muon(params, lr=lr, ns_preset=preset, ns_steps=steps)

    return build


def _go_gluon_spectral(params: list[nn.Parameter], lr: float) -> Optimizer:
    return go.Gluon(params, lr=lr, norm="spectral", momentum=0.9)


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


def _entries() -> list[_Entry]:
    entries = [
        _Entry("torch.optim.Muon", _torch_muon, "muon", "reference; adjust_lr_fn='original'"),
        _Entry("go.muon jordan5", _go_muon("jordan", 5), "muon"),
        _Entry("go.muon polar_express4", _go_muon("polar_express", 4), "muon"),
        _Entry("go.muon polar_express5", _go_muon("polar_express", 5), "muon"),
        _Entry("go.Gluon spectral/rms", _go_gluon_spectral, "rms", "Scion hidden update"),
    ]
    try:
        import pytorch_optimizer  # noqa: F401
    except ImportError:
        NOT_MEASURED["pytorch_optimizer"] = "not installed"
    else:
        entries.append(
            _Entry("pto.Muon", _pto_muon, "muon", _pto_muon_plain_list_note()),
        )
        entries.append(_Entry("pto.SCION", _pto_scion, "rms", "momentum=0.1 (== beta 0.9)"))
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


def _direction_error(entry: _Entry, grads: Sequence[Tensor]) -> float | None:
    """Mean relative Frobenius error of the first step's direction against ``polar_svd(g)``.

    From zero parameters and fresh (zero) momentum with ``lr=1`` and no weight decay, every LMO
    optimizer here moves to ``-c * P(m)`` where ``m`` is a positive multiple of ``g`` (EMA:
    ``(1-beta) g``; Nesterov: ``g.lerp((1-beta) g, beta)``) and ``c`` is its shape factor, so
    ``-p / c`` is its polar-factor estimate of ``g``.
    """
    if entry.shape_rule is None:
        return None
    params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    opt = entry.factory(params, 1.0)
    _set_grads(params, grads)
    opt.step()
    errors = []
    for p, g in zip(params, grads, strict=True):
        c = shape_factor(entry.shape_rule, g.size(0), g.size(1))
        errors.append(relative_error(-p.detach() / c, polar_svd(g)))
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
        "polar_error", "state_bytes_per_param", "note"}, ...]}}}``; ``ratio`` is the median
        over ``torch.optim.Muon``'s median, ``polar_error`` is ``None`` for AdamW.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"bench_step: need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    if threads is not None:
        torch.set_num_threads(threads)
    entries = _entries()
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
                    "polar_error": _direction_error(entry, g),
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
        f"load average {meta.get('loadavg_start')} -> {meta.get('loadavg_end')}",
    ]
    for width, block in result["widths"].items():
        lines += [
            "",
            f"width {width}: {block['n_matrices']} matrices, {block['n_params']:,} parameters",
            "",
            "| optimizer | median ms | IQR ms | min-max ms | vs torch Muon | polar err "
            "| state B/param |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in block["rows"]:
            err = "-" if r["polar_error"] is None else f"{r['polar_error']:.4f}"
            lines.append(
                f"| {r['name']} | {r['median_ms']:.2f} | {r['q1_ms']:.2f}-{r['q3_ms']:.2f} "
                f"| {r['min_ms']:.2f}-{r['max_ms']:.2f} | {r['ratio']:.2f} | {err} "
                f"| {r['state_bytes_per_param']:.1f} |"
            )
    notes = [f"- {r['name']}: {r['note']}" for r in _first_rows(result) if r["note"]]
    notes += [f"- {name}: {why}" for name, why in result.get("not_measured", {}).items()]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines)


def _first_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    blocks = list(result["widths"].values())
    return list(blocks[0]["rows"]) if blocks else []


# -- bench_scaling -------------------------------------------------------------------------------


def _scaling_methods() -> dict[str, Callable[[Tensor], Tensor]]:
    def ns(preset: str, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
        return lambda g: newton_schulz(g, preset=preset, steps=5, dtype=dtype)

    return {
        "NS jordan5 bf16": ns("jordan", torch.bfloat16),
        "NS jordan5 fp32": ns("jordan", torch.float32),
        "NS polar_express5 bf16": ns("polar_express", torch.bfloat16),
        "NS polar_express5 fp32": ns("polar_express", torch.float32),
        "polar_svd fp32": polar_svd,
    }


def bench_scaling(
    sizes: Sequence[int] = (256, 512, 1024, 2048),
    *,
    repeats: int = 5,
    warmup: int = 1,
    threads: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Median time (ms) of Newton–Schulz and SVD polar factors on ``n x n`` Gaussian matrices.

    Returns:
        ``{"meta": ..., "sizes": [...], "series": {method: [median ms per size]}}``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"bench_scaling: need repeats >= 1 and warmup >= 0, got {repeats}")
    if threads is not None:
        torch.set_num_threads(threads)
    methods = _scaling_methods()
    meta = _meta(threads, repeats=repeats, warmup=warmup, seed=seed)
    series: dict[str, list[float]] = {name: [] for name in methods}
    gen = torch.Generator().manual_seed(seed)
    for n in sizes:
        g = torch.randn(n, n, generator=gen)
        for name, fn in methods.items():
            for _ in range(warmup):
                fn(g)
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn(g)
                ts.append((time.perf_counter() - t0) * 1e3)
            series[name].append(statistics.median(ts))
    meta["loadavg_end"] = _load()
    return {"meta": meta, "sizes": list(sizes), "series": series}


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
    return "\n".join(lines)


def plot_scaling(result: dict[str, Any], path: str | Path) -> Path:
    """Plot a :func:`bench_scaling` result as time vs ``n`` on log-log axes; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, values in result["series"].items():
        ax.plot(result["sizes"], values, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("n (matrix is n x n)")
    ax.set_ylabel("median time (ms)")
    ax.set_title(f"Polar factor cost, CPU, {result['meta']['threads']} threads")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- command line --------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


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
    p.add_argument("--out", type=Path, default=None, help="write bench.json, bench.md, scaling.png")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run both benchmarks, print the tables and optionally write them under ``--out``."""
    args = build_parser().parse_args(argv)
    step = bench_step(
        args.widths,
        repeats=args.repeats,
        warmup=args.warmup,
        n_layer=args.n_layer,
        threads=args.threads,
        seed=args.seed,
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
    if args.out is not None:
        out: Path = args.out
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps({"step": step, "scaling": scaling}, indent=2))
        md = "# Benchmark\n\n" + text + "\n"
        if scaling is not None:
            plot_scaling(scaling, out / "scaling.png")
            md += "\n![scaling](scaling.png)\n"
        (out / "bench.md").write_text(md)
        print(f"\nwrote {out}/bench.json, bench.md" + (", scaling.png" if scaling else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
