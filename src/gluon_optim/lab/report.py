"""Tables and plots, read from run folders only (plots never need the training process)."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gluon_optim.lab.train import read_metrics


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
        rows.append(row)
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of :func:`summary_rows`."""
    has_acc = any("val_acc_mean" in r for r in rows)
    head = ["optimizer", "lr", "seeds", "val loss (mean ± std)"]
    head += ["val acc"] if has_acc else []
    head += ["train time s", "median step ms", "opt state MiB"]
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
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ema(values: Sequence[float], alpha: float = 0.1) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else (1 - alpha) * acc + alpha * v
        out.append(acc)
    return out


def plot_runs(
    groups: Mapping[str, Sequence[str | Path]], path: str | Path, title: str = ""
) -> Path:
    """Loss against steps and against wall-clock seconds, one colour per label.

    Thin lines: the smoothed training loss of each seed; markers and thick lines: validation
    loss averaged over seeds at the evaluation steps.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_step, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, run_dirs) in enumerate(groups.items()):
        color = colors[i % len(colors)]
        val_by_step: dict[int, list[float]] = {}
        time_by_step: dict[int, list[float]] = {}
        for run in run_dirs:
            recs = read_metrics(run)
            steps = [r["step"] for r in recs]
            ax_step.plot(steps, _ema([r["loss"] for r in recs]), color=color, alpha=0.25, lw=0.8)
            for r in recs:
                if "val_loss" in r:
                    val_by_step.setdefault(r["step"], []).append(r["val_loss"])
                    time_by_step.setdefault(r["step"], []).append(r["time"])
        if val_by_step:
            xs = sorted(val_by_step)
            ys = [statistics.fmean(val_by_step[s]) for s in xs]
            ts = [statistics.fmean(time_by_step[s]) for s in xs]
            ax_step.plot(xs, ys, "o-", color=color, lw=2, ms=3, label=f"{label} (val)")
            ax_time.plot(ts, ys, "o-", color=color, lw=2, ms=3, label=label)
    ax_step.set_xlabel("step")
    ax_step.set_ylabel("loss (thin: train, smoothed; thick: validation)")
    ax_time.set_xlabel("wall-clock seconds (training only)")
    ax_time.set_ylabel("validation loss")
    for ax in (ax_step, ax_time):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
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
