"""Comparisons and sweeps: many runs of one configuration, summarised honestly.

``compare`` trains several optimizers x seeds on the same model, data and budget and reports the
mean ± std of the final validation loss, the training time and the optimizer-state memory, all
measured in that call. ``sweep`` runs a learning-rate grid (and optionally a multiplier on the
Scion-style scales) per optimizer with the same budget for each, and reports the best setting.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gluon_optim.lab import report
from gluon_optim.lab.train import RunConfig, RunResult, train


def _run_all(
    base: RunConfig, out: Path, variants: Sequence[tuple[str, RunConfig]], progress: bool
) -> list[tuple[str, RunResult]]:
    results = []
    for label, config in variants:
        run_dir = out / f"{label}-s{config.seed}"
        try:
            result = train(config, run_dir, progress=progress)
        except FloatingPointError:
            # A diverged run is a result, not a crash: it is reported as such in the table.
            result = RunResult(
                str(run_dir),
                config.optimizer,
                config.seed,
                config.steps,
                math.nan,
                None,
                math.nan,
                0,
                config.lr or math.nan,
            )
            (run_dir / "summary.json").write_text(json.dumps(dataclasses.asdict(result)) + "\n")
        results.append((label, result))
    return results


def _label(name: str, lr: float | None, options: dict[str, Any]) -> str:
    # A folder-safe label: file paths (fit=...) are reduced to the option's name.
    parts = [name] + ([f"lr{lr:g}"] if lr is not None else [])
    for key, value in options.items():
        parts.append(key if key == "fit" else f"{key}{value}")
    return re.sub(r"[^A-Za-z0-9_.]+", "-", "-".join(parts)).strip("-")


def parse_spec(spec: str) -> tuple[str, float | None, dict[str, Any]]:
    """``name[@lr][:key=value]...`` -> (name, lr or None, options); values parsed as JSON.

    ``limuon@0.02:rank=4`` is LiMuon at lr 0.02 with rank 4; ``unscion`` its tuned default.
    """
    head, *pairs = spec.split(":")
    name, _, lr_text = head.partition("@")
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"optimizer spec {spec!r}: expected key=value after ':', got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    try:
        lr = float(lr_text) if lr_text else None
    except ValueError:
        raise ValueError(f"optimizer spec {spec!r}: lr {lr_text!r} is not a number") from None
    return name, lr, options


def compare(
    base: RunConfig,
    optimizers: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | Path,
    *,
    progress: bool = True,
    title: str = "",
    target_loss: float | None = None,
) -> dict[str, Any]:
    """Train every optimizer x seed on ``base``; write ``report.md``, ``compare.json``, a plot.

    ``optimizers`` are specs ``name[@lr][:key=value]...`` (:func:`parse_spec`) with names from
    :data:`gluon_optim.lab.optimizers.OPTIMIZERS`: ``unscion@0.0005``, ``limuon:rank=4``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    variants = []
    for spec in optimizers:
        name, lr, options = parse_spec(spec)
        config = dataclasses.replace(
            base, optimizer=name, lr=lr, opt_options={**base.opt_options, **options}
        )
        label = _label(name, lr, options)
        for seed in seeds:
            variants.append((label, dataclasses.replace(config, seed=seed)))
    for _, config in variants:  # every run checked before the first one trains
        config.validate()
    results = _run_all(base, out, variants, progress)
    summaries = [{**dataclasses.asdict(r), "label": label} for label, r in results]
    if target_loss is not None:
        for s in summaries:
            reached = (
                report.target_reached(s["run_dir"], target_loss)
                if math.isfinite(s["final_val_loss"])
                else (None, None)
            )
            s["steps_to_target"], s["evals_to_target"] = reached
    rows = report.summary_rows(summaries)
    table = report.format_table(rows)
    groups: dict[str, list[str]] = {}
    for label, r in results:
        if math.isfinite(r.final_val_loss):
            groups.setdefault(label, []).append(r.run_dir)
    two_point = any(
        r["grad_evals"] != r["step"] * base.grad_accum
        for _, res in results
        if math.isfinite(res.final_val_loss)
        for r in report.read_metrics(res.run_dir)[-1:]
    )
    axes = ("step", "grad_evals", "time") if two_point else ("step", "time")
    plot = report.plot_runs(
        groups, out / "loss.png", title or f"{base.model} on {base.data}", axes=axes
    )
    budget = (
        f"{base.steps} steps, batch {base.batch_size} x accum {base.grad_accum}, "
        f"schedule {base.schedule}, seeds {list(seeds)}"
    )
    md = [
        f"# {title or 'Comparison'}",
        "",
        f"Model `{base.model}`, data `{base.data}`, {budget}.",
        "Every number below was measured in this run (CPU time of the training loop only)."
        + (f" Target validation loss: {target_loss}." if target_loss is not None else ""),
        "",
        table,
        "",
        f"![loss]({plot.name})",
        "",
        "Run folders: " + ", ".join(f"`{Path(r.run_dir).name}`" for _, r in results),
    ]
    (out / "report.md").write_text("\n".join(md) + "\n")
    payload = {"config": dataclasses.asdict(base), "rows": rows, "runs": summaries}
    (out / "compare.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return {"table": table, "rows": rows, "report": str(out / "report.md"), "plot": str(plot)}


def sweep(
    base: RunConfig,
    optimizers: Sequence[str],
    lrs: Sequence[float] | None,
    out_dir: str | Path,
    *,
    lr_factors: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
    seeds: Sequence[int] = (0,),
    progress: bool = True,
) -> dict[str, Any]:
    """An lr grid per optimizer (absolute ``lrs``, or ``lr_factors`` times its tuned default).

    ``optimizers`` are names or specs ``name[:key=value]...`` (:func:`parse_spec`, without an
    ``@lr``: the grid sets it), so one sweep can cover several settings of one optimizer
    (``unscion:momentum=0.8,unscion:momentum=0.95``); points and best lrs are keyed by the spec.
    Returns and writes (``sweep.json``, ``sweep.md``) every point and the best lr per spec by
    mean final validation loss.
    """
    from gluon_optim.lab.optimizers import resolve

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    points: list[dict[str, Any]] = []
    best: dict[str, dict[str, Any]] = {}
    plan: list[tuple[str, float, list[tuple[str, RunConfig]]]] = []
    for spec in optimizers:
        name, spec_lr, options = parse_spec(spec)
        if spec_lr is not None:
            raise ValueError(f"sweep: {spec!r} gives an lr; the sweep's grid sets it (drop @lr)")
        opts = {**base.opt_options, **options}
        default_lr, _ = resolve(name, base.model, None, opts)
        grid = list(lrs) if lrs else [default_lr * f for f in lr_factors]
        for lr in grid:
            label = _label(name, lr, options)
            variants = [
                (label, dataclasses.replace(base, optimizer=name, lr=lr, opt_options=opts, seed=s))
                for s in seeds
            ]
            for _, config in variants:  # every point checked before the first one trains
                config.validate()
            plan.append((spec, lr, variants))
    for name, lr, variants in plan:
        results = _run_all(base, out, variants, progress)
        loss, std = report.mean_std([r.final_val_loss for _, r in results])
        point = {
            "optimizer": name,
            "lr": lr,
            "val_loss": loss,
            "val_loss_std": std,
            "seeds": len(seeds),
        }
        points.append(point)
        if math.isfinite(loss) and (name not in best or loss < best[name]["val_loss"]):
            best[name] = point
    lines = ["| optimizer | lr | val loss | best |", "|---|---|---|---|"]
    for p in points:
        mark = "**best**" if best.get(p["optimizer"]) is p else ""
        val = "diverged" if not math.isfinite(p["val_loss"]) else f"{p['val_loss']:.4f}"
        lines.append(f"| {p['optimizer']} | {p['lr']:.3g} | {val} | {mark} |")
    table = "\n".join(lines)
    (out / "sweep.md").write_text(
        f"# LR sweep: {base.model} on {base.data}, {base.steps} steps\n\n{table}\n"
    )
    payload = {"config": dataclasses.asdict(base), "points": points, "best": best}
    (out / "sweep.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return {"table": table, "points": points, "best": best}
