"""Tables and plots, read from run folders only (plots never need the training process)."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gluon_optim.lab.train import load_checkpoint, read_metrics

__all__ = [
    "format_table",
    "load_summaries",
    "mean_std",
    "plot_runs",
    "read_metrics",
    "summary_rows",
    "target_reached",
]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN-aware."""
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def summary_rows(summaries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per optimizer (in first-seen order) aggregating its seeds' ``summary.json``."""
    by_opt: dict[str, list[Mapping[str, Any]]] = {}
    for s in summaries:
        by_opt.setdefault(str(s["label"] if "label" in s else s["optimizer"]), []).append(s)
    rows = []
    for name, runs in by_opt.items():
        loss_m, loss_s = mean_std([float(r["final_val_loss"]) for r in runs])
        acc = [r["final_val_accuracy"] for r in runs if r.get("final_val_accuracy") is not None]
        time_m, time_s = mean_std([float(r["train_time_s"]) for r in runs])
        row: dict[str, Any] = {
            "optimizer": name,
            "lr": runs[0]["lr"],
            "seeds": len(runs),
            "val_loss_mean": loss_m,
            "val_loss_std": loss_s,
            "time_s_mean": time_m,
            "time_s_std": time_s,
            "step_ms_median": statistics.median(
                [float(r.get("median_step_ms", math.nan)) for r in runs]
            ),
            "state_mib": max(int(r["optimizer_state_bytes"]) for r in runs) / 2**20,
            "diverged": sum(1 for r in runs if not math.isfinite(float(r["final_val_loss"]))),
        }
        if acc:
            row["val_acc_mean"], row["val_acc_std"] = mean_std([float(a) for a in acc])
        if "steps_to_target" in runs[0]:
            reached = [r for r in runs if r["steps_to_target"] is not None]
            row["reached"] = len(reached)
            row["steps_to_target"] = (
                statistics.fmean(r["steps_to_target"] for r in reached) if reached else None
            )
            row["evals_to_target"] = (
                statistics.fmean(r["evals_to_target"] for r in reached) if reached else None
            )
        rows.append(row)
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of :func:`summary_rows`."""
    has_acc = any("val_acc_mean" in r for r in rows)
    head = ["optimizer", "lr", "seeds", "val loss (mean ± std)"]
    head += ["val acc"] if has_acc else []
    has_target = any("steps_to_target" in r for r in rows)
    head += ["train time s", "median step ms", "opt state MiB"]
    head += ["steps to target", "grad evals to target"] if has_target else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        loss = (
            "diverged"
            if not math.isfinite(r["val_loss_mean"])
            else f"{r['val_loss_mean']:.4f} ± {r['val_loss_std']:.4f}"
        )
        if r.get("diverged"):
            loss += f" ({r['diverged']} diverged)"
        cells = [str(r["optimizer"]), f"{r['lr']:.3g}", str(r["seeds"]), loss]
        if has_acc:
            acc = r.get("val_acc_mean")
            cells.append("-" if acc is None else f"{100 * acc:.1f}% ± {100 * r['val_acc_std']:.1f}")
        cells += [f"{r['time_s_mean']:.1f}", f"{r['step_ms_median']:.1f}", f"{r['state_mib']:.2f}"]
        if has_target:
            for key in ("steps_to_target", "evals_to_target"):
                value = r.get(key)
                note = f" ({r['reached']}/{r['seeds']})" if r.get("reached") != r["seeds"] else ""
                cells.append("not reached" if value is None else f"{value:.0f}{note}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ema(values: Sequence[float], alpha: float = 0.1) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else (1 - alpha) * acc + alpha * v
        out.append(acc)
    return out


def target_reached(run_dir: str | Path, target: float) -> tuple[int | None, int | None]:
    """(step, gradient evaluations) of the first evaluation with validation loss <= target."""
    for r in read_metrics(run_dir):
        if "val_loss" in r and r["val_loss"] <= target:
            return int(r["step"]), int(r.get("grad_evals", r["step"]))
    return None, None


_AXES = {
    "step": "step",
    "grad_evals": "gradient evaluations (batches)",
    "time": "wall-clock seconds (training only)",
}


def plot_runs(
    groups: Mapping[str, Sequence[str | Path]],
    path: str | Path,
    title: str = "",
    axes: Sequence[str] = ("step", "time"),
) -> Path:
    """Loss against steps (and gradient evaluations, wall-clock seconds), one colour per label.

    The first panel shows the smoothed training loss of each seed as thin lines; on every
    panel, markers and thick lines are the validation loss averaged over seeds at the
    evaluation steps.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, panels = plt.subplots(1, len(axes), figsize=(5.5 * len(axes), 4.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, run_dirs) in enumerate(groups.items()):
        color = colors[i % len(colors)]
        val: dict[int, list[dict[str, Any]]] = {}
        for run in run_dirs:
            recs = read_metrics(run)
            if axes[0] == "step":
                xs = [r["step"] for r in recs]
                ys = _ema([r["loss"] for r in recs])
                panels[0][0].plot(xs, ys, color=color, alpha=0.25, lw=0.8)
            for r in recs:
                if "val_loss" in r:
                    val.setdefault(r["step"], []).append(r)
        if not val:
            continue
        steps = sorted(val)
        ys = [statistics.fmean(r["val_loss"] for r in val[s]) for s in steps]
        for ax, key in zip(panels[0], axes, strict=True):
            xs = [statistics.fmean(r.get(key, r["step"]) for r in val[s]) for s in steps]
            ax.plot(xs, ys, "o-", color=color, lw=2, ms=3, label=label)
    for ax, key in zip(panels[0], axes, strict=True):
        ax.set_xlabel(_AXES[key])
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if axes[0] == "step":
        panels[0][0].set_ylabel("loss (thin: train, smoothed; thick: validation)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def load_summaries(run_dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """``summary.json`` of each finished run folder."""
    out = []
    for run in run_dirs:
        path = Path(run) / "summary.json"
        if not path.exists():
            raise FileNotFoundError(f"{run} has no summary.json (unfinished run?)")
        out.append(json.loads(path.read_text()))
    return out


def run_labels(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """A plot label per run config: runs that differ only by seed share one (and are averaged).

    The label is the optimizer's name while all its runs share their settings; otherwise the
    name plus the settings that differ between them (``muon lr=0.01``), so runs of different
    settings are never averaged under one name.
    """
    settings = [{k: v for k, v in c.items() if k != "seed"} for c in configs]
    keys = [json.dumps(s, sort_keys=True, default=str) for s in settings]
    by_name: dict[str, list[int]] = {}
    for i, c in enumerate(configs):
        by_name.setdefault(str(c["optimizer"]), []).append(i)
    labels = [str(c["optimizer"]) for c in configs]
    for name, runs in by_name.items():
        if len({keys[i] for i in runs}) == 1:
            continue
        fields = sorted(
            k for k in settings[runs[0]] if len({_value_key(settings[i], k) for i in runs}) > 1
        )
        for i in runs:
            labels[i] = name + " " + " ".join(f"{k}={settings[i].get(k)}" for k in fields)
    return labels


def _value_key(settings: Mapping[str, Any], key: str) -> str:
    return json.dumps(settings.get(key), sort_keys=True, default=str)


def compare_runs(run_a: str | Path, run_b: str | Path) -> dict[str, Any]:
    """How far two runs of the same configuration are apart: losses per step, final weights.

    For checking a distributed run against one process: ``max_loss_diff`` is the largest
    ``|loss_a - loss_b|`` over the common steps, ``first_diff_step`` the first step whose
    losses differ at all (``None``: none does), and ``max_param_diff`` the largest entry of
    ``|X_a - X_b|`` in the final checkpoints (``0.0``: bit-identical).
    """
    a, b = read_metrics(run_a), read_metrics(run_b)
    steps = min(len(a), len(b))
    diffs = [abs(x["loss"] - y["loss"]) for x, y in zip(a[:steps], b[:steps], strict=True)]
    first = next((a[i]["step"] for i, d in enumerate(diffs) if d != 0.0), None)
    models = [load_checkpoint(Path(r) / "checkpoint.pt")["model"] for r in (run_a, run_b)]
    shape_a, shape_b = ({k: v.shape for k, v in m.items()} for m in models)
    if shape_a != shape_b:  # other parameters, or the same ones at other sizes
        raise ValueError(f"{run_a} and {run_b} hold different models")
    param_diff = max(
        float((models[0][k].double() - models[1][k].double()).abs().max()) for k in models[0]
    )
    return {
        "steps": steps,
        "max_loss_diff": max(diffs, default=0.0),
        "first_diff_step": first,
        "max_param_diff": param_diff,
    }
