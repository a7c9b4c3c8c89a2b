"""How the polar factor's cost grows with the matrix, and LiMuon's randomized SVD with its rank.

:func:`bench_scaling` times :func:`~gluon_optim.polar.newton_schulz` and
:func:`~gluon_optim.polar.polar_svd` on square ``n x n`` (and ``n x 4n``) Gaussian matrices,
and :func:`~gluon_optim.lowrank.rsvd` against rank; :func:`plot_scaling` draws both.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gluon_optim.lab.bench.timing import load_average, machine_meta
from gluon_optim.lowrank import rsvd
from gluon_optim.polar import newton_schulz, polar_svd


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
    meta = machine_meta(threads, repeats=repeats, warmup=warmup, seed=seed)
    series: dict[str, list[float]] = {name: [] for name in methods}
    gen = torch.Generator().manual_seed(seed)
    for n in sizes:
        inputs = {r: torch.randn(n, r * n, generator=gen) for r in {a for a, _ in methods.values()}}
        for name, (aspect, fn) in methods.items():
            g = inputs[aspect]
            series[name].append(_median_ms(lambda: fn(g), repeats, warmup))  # noqa: B023
    rsvd_block = _bench_rsvd(gen, rsvd_n, ranks, repeats, warmup, seed) if ranks else None
    meta["loadavg_end"] = load_average()
    return {"meta": meta, "sizes": list(sizes), "series": series, "rsvd": rsvd_block}


def _bench_rsvd(
    gen: torch.Generator, n: int, ranks: Sequence[int], repeats: int, warmup: int, seed: int
) -> dict[str, Any]:
    """RSVD of one ``n x n`` Gaussian matrix per rank, next to its full SVD and 5 NS steps."""
    a = torch.randn(n, n, generator=gen)
    return {
        "n": n,
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
    _plot_series(axes[0] if block else axes, result)
    if block:
        _plot_rsvd(axes[1], block)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_series(ax: Any, result: dict[str, Any]) -> None:
    for name, values in result["series"].items():
        style = "--" if "n x 4n" in name else "-"
        ax.plot(result["sizes"], values, style, marker="o", label=name)
    threads = result["meta"]["threads"]
    _log_log(
        ax,
        "n (matrix is n x n, or n x 4n where named)",
        f"Polar factor cost, CPU, {threads} threads",
        7,
    )


def _plot_rsvd(ax: Any, block: dict[str, Any]) -> None:
    ax.plot(block["ranks"], block["ms"], marker="o", label="rsvd (LiMuon storm_lowrank)")
    ax.axhline(block["svd_ms"], color="gray", linestyle="--", label="full SVD")
    ax.axhline(block["ns_ms"], color="tab:green", linestyle=":", label="NS pe5 bf16")
    _log_log(ax, "rank r", f"Randomized SVD of a {block['n']} x {block['n']} matrix", 8)


def _log_log(ax: Any, xlabel: str, title: str, legend_size: int) -> None:
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("median time (ms)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=legend_size)
