"""The Gluon paper's smoothness experiments on the lab, scaled down (``gluon-optim smoothness``).

Two protocols, as in Riabinin et al. (arXiv 2505.13416, section 5 and the official experiment
code):

* ``gpt``: a GPT with a tied embedding trained by unconstrained Scion at a constant lr with
  momentum beta = 0.9, measuring every ``every`` steps (the paper: NanoGPT-124M, every 50 of
  5100 steps);
* ``cnn``: the CNN trained full batch by unconstrained Scion with no momentum, measuring every
  ``every`` steps (the paper: CIFAR-10, every epoch).

Each experiment trains with a :class:`gluon_optim.smoothness.SmoothnessProbe` attached, fits
``L_hat ~ L0 + L1 ||g||_*`` per parameter and per role, plots ``L_hat`` against ``||g||_*``
per role with the fitted line, and writes a report with the fitted constants, the theoretical
radii ``1/L1`` next to the radii the configuration used and, with ``sweep=True``, next to the
best radii of an lr sweep at the same budget.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from gluon_optim import smoothness as sm
from gluon_optim.lab import experiments
from gluon_optim.lab.optimizers import resolve
from gluon_optim.lab.train import RunConfig, train
from gluon_optim.presets import SCION_SCALES

#: The two protocols; any field can be overridden.
PROTOCOLS: dict[str, RunConfig] = {
    "gpt": RunConfig(
        model="gpt-tiny",
        data="stdlib",
        optimizer="unscion",
        model_options={"tied": True},
        opt_options={"momentum": 0.9},
        steps=600,
        batch_size=16,
        schedule="constant",
        eval_every=100,
        probe_every=10,
    ),
    "cnn": RunConfig(
        model="cnn-small",
        data="digits",
        optimizer="unscion",
        opt_options={"momentum": 0.0},
        # Full-batch training memorises the 1347 digits in about 60 steps, after which every
        # gradient, and so L_hat, collapses towards 0 and the fit only sees the early phase;
        # 50 steps measured at every step keeps the protocol in the regime the paper's
        # CIFAR-10 run (where the loss never vanishes) observes. Use more steps on CIFAR-10.
        steps=50,
        batch_size=0,  # full batch
        schedule="constant",
        eval_every=25,
        probe_every=1,
    ),
}


def _fmt(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}g}"


def format_radii(rows: list[dict[str, Any]]) -> str:
    """The per-role table: fitted constants, theory ``1/L1``, tuned and swept ``lr * scale``."""
    lines = [
        "| role | L0 | L1 | MSE_rel | theory 1/L1 | tuned lr*scale | best swept lr*scale |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        swept = "not swept" if r["swept_radius"] is None else _fmt(r["swept_radius"])
        lines.append(
            f"| {r['role']} | {_fmt(r['l0'])} | {_fmt(r['l1'])} | {_fmt(r['mse_rel'], 3)} | "
            f"{_fmt(r['theory_radius'])} | {_fmt(r['tuned_radius'])} | {swept} |"
        )
    return "\n".join(lines)


def plot_role(records: list[dict[str, Any]], fit: sm.Fit, role: str, path: Path) -> Path:
    """``L_hat`` against ``||g||_*`` for one role (one colour per parameter), with the fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    by_param: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        if r.get("L_hat") is not None and r.get("grad_dual") is not None:
            by_param.setdefault(str(r["param"]), []).append((r["grad_dual"], r["L_hat"]))
    for name, pts in by_param.items():
        xs, ys = zip(*pts, strict=True)
        ax.scatter(xs, ys, s=9, alpha=0.6, label=name if len(by_param) <= 8 else None)
    xs_all = [x for pts in by_param.values() for x, _ in pts]
    if fit.l0 is not None and fit.l1 is not None and xs_all:
        lo, hi = 0.0, max(xs_all) * 1.05
        ax.plot(
            [lo, hi],
            [fit.l0 + fit.l1 * lo, fit.l0 + fit.l1 * hi],
            "k-",
            lw=1.5,
            label=f"L0={fit.l0:.3g}, L1={fit.l1:.3g}",
        )
    ax.set_xlabel("||g||_*  (dual norm of the minibatch gradient)")
    ax.set_ylabel("L_hat = ||g_{k+1} - g_k||_* / ||X_{k+1} - X_k||")
    ax.set_title(f"role {role}: {len(xs_all)} points")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def protocol_config(name: str, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Protocol ``name``'s run configuration with ``overrides`` (any :class:`RunConfig` field)."""
    if name not in PROTOCOLS:
        raise ValueError(
            f"Unknown smoothness protocol {name!r}; expected one of {sorted(PROTOCOLS)}"
        )
    return dataclasses.replace(PROTOCOLS[name], **(overrides or {}))


def _resolved(config: RunConfig) -> tuple[float, dict[str, Any], dict[str, float]]:
    """The protocol optimizer's lr, options and radius scale per role (Scion's table)."""
    lr, options = resolve(config.optimizer, config.model, config.lr, config.opt_options)
    return lr, options, {**SCION_SCALES, **options.get("scales", {})}


def run_protocol(
    name: str,
    out_dir: str | Path,
    *,
    overrides: dict[str, Any] | None = None,
    sweep_factors: tuple[float, ...] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Train protocol ``name`` with the probe, fit, plot and report into ``out_dir``.

    Returns a dict with the per-parameter and per-role fits, the radius table and the paths.
    ``sweep_factors`` (e.g. ``(0.25, 0.5, 1, 2, 4)``) adds an lr sweep of the same optimizer at
    the same budget (without the probe), whose best lr gives the "swept" radii.
    """
    config = protocol_config(name, overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    result = train(config, run_dir, progress=progress)
    records = sm.read_records(run_dir / "smoothness.jsonl")
    by_param = sm.fit_records(records, by="param")
    by_role = sm.fit_records(records, by="role")
    sm.save_fits(out / "fits-param.json", by_param)
    sm.save_fits(out / "fits-role.json", by_role)

    lr, options, scales = _resolved(config)
    swept_lr = None
    if sweep_factors:
        base = dataclasses.replace(config, probe_every=0)
        res = experiments.sweep(
            base,
            [config.optimizer],
            [lr * f for f in sweep_factors],
            out / "sweep",
            progress=progress,
        )
        best = res["best"].get(config.optimizer)
        swept_lr = best["lr"] if best else None

    plots = {}
    for role, fit in by_role.items():
        role_records = [r for r in records if r.get("role") == role]
        plots[role] = plot_role(role_records, fit, role, out / f"smoothness-{role}.png").name

    radius_rows = []
    for role, fit in by_role.items():
        theory = 1.0 / fit.l1 if fit.l1 else None
        tuned = lr * scales.get(role, 1.0)
        swept = swept_lr * scales.get(role, 1.0) if swept_lr is not None else None
        radius_rows.append(
            {
                "role": role,
                "l0": fit.l0,
                "l1": fit.l1,
                "mse_rel": fit.mse_rel,
                "n_points": fit.n_points,
                "theory_radius": theory,
                "tuned_radius": tuned,
                "swept_radius": swept,
                "note": fit.note,
            }
        )

    lines = [
        f"# Layer-wise smoothness: protocol `{name}`",
        "",
        f"`{config.model}` (options {config.model_options}) on `{config.data}`, optimizer "
        f"`{config.optimizer}` at constant lr {lr:g} with {options}, {config.steps} steps, batch "
        f"{'full' if config.batch_size <= 0 else config.batch_size}, probe every "
        f"{config.probe_every} steps. Final validation loss {_fmt(result.final_val_loss)}.",
        "",
        "## Fitted constants per parameter",
        "",
        "| parameter | role | L0 | L1 | MSE_rel | points | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, fit in by_param.items():
        lines.append(
            f"| {key} | {fit.role} | {_fmt(fit.l0)} | {_fmt(fit.l1)} | {_fmt(fit.mse_rel, 3)} | "
            f"{fit.n_points} | {fit.note} |"
        )
    lines += [
        "",
        "## Radii per role: theory 1/L1 against the configuration and the sweep",
        "",
        format_radii(radius_rows),
    ]
    lines += ["", *[f"![{role}]({png})" for role, png in plots.items()], ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    payload = {
        "protocol": name,
        "config": dataclasses.asdict(config),
        "lr": lr,
        "swept_lr": swept_lr,
        "radii": radius_rows,
        "fits_param": {k: dataclasses.asdict(f) for k, f in by_param.items()},
    }
    (out / "smoothness.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return {
        "report": str(out / "report.md"),
        "fits_role": str(out / "fits-role.json"),
        "radii": radius_rows,
        "by_param": by_param,
        "plots": plots,
    }


#: The displacements of the radius check, as multiples of each layer's radius.
CHECK_DISPLACEMENTS = "0.1,0.3,1,3"


def _interval(boot: dict[str, Any], key: str) -> str:
    span = boot.get(key)
    return "n/a" if span is None else f"[{_fmt(span[0], 3)}, {_fmt(span[1], 3)}]"


def radius_check(
    name: str,
    out_dir: str | Path,
    factors: tuple[float, ...] = (0.25, 1.0, 4.0),
    *,
    overrides: dict[str, Any] | None = None,
    bootstrap: int = 200,
    progress: bool = True,
) -> dict[str, Any]:
    """Probe protocol ``name`` at several radii and tell the function from the step size.

    Each factor ``f`` trains the protocol at ``f`` times its lr. The run carries the trajectory
    probe and the controlled-displacement probe, which evaluates a fixed batch at
    ``CHECK_DISPLACEMENTS`` times each layer's radius. Per role and radius it reports ``L1``
    of both estimates with bootstrap intervals, and ``L1 * t``. It also gives the log-log slope
    of ``L1`` against ``t`` (:func:`gluon_optim.smoothness.radius_dependence`): about ``-1``
    when the estimate only reflects the radius, about 0 when it describes the function. Writes
    ``radius-check.md`` and ``radius-check.json`` into ``out_dir``.
    """
    base = protocol_config(name, overrides)
    if not factors or not all(f > 0 and math.isfinite(f) for f in factors):
        raise ValueError(f"radius_check: factors must be numbers > 0, got {factors}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not base.probe_displacement:
        base = dataclasses.replace(base, probe_displacement=CHECK_DISPLACEMENTS)
    lr0, _, scales = _resolved(base)
    rows: list[dict[str, Any]] = []
    for f in factors:
        config = dataclasses.replace(base, lr=lr0 * f)
        run_dir = out / f"lr-x{f:g}"
        result = train(config, run_dir, progress=progress)
        trajectory = sm.read_records(run_dir / "smoothness.jsonl")
        displaced = sm.read_records(run_dir / "displacement.jsonl")
        for role in dict.fromkeys(r["role"] for r in trajectory):
            t = lr0 * f * scales.get(role, 1.0)
            tr = [r for r in trajectory if r["role"] == role]
            dp = [r for r in displaced if r["role"] == role]
            fit_tr, fit_dp = sm.fit_l0_l1(tr, role=role), sm.fit_l0_l1(dp, role=role)
            per_s = {
                s: sm.fit_l0_l1([r for r in dp if r["scale"] == s]).l1
                for s in config.displacement_scales()
            }
            rows.append(
                {
                    "role": role,
                    "factor": f,
                    "radius": t,
                    "val_loss": result.final_val_loss,
                    "trajectory": dataclasses.asdict(fit_tr),
                    "trajectory_boot": sm.bootstrap_fit(tr, samples=bootstrap),
                    "displacement": dataclasses.asdict(fit_dp),
                    "displacement_boot": sm.bootstrap_fit(dp, samples=bootstrap),
                    "displacement_by_scale": per_s,
                    "displacement_dependence": sm.radius_dependence(
                        {s * t: l1 for s, l1 in per_s.items()}
                    ),
                }
            )
    summary = {}
    for role in dict.fromkeys(r["role"] for r in rows):
        mine = [r for r in rows if r["role"] == role]
        summary[role] = {
            "trajectory": sm.radius_dependence({r["radius"]: r["trajectory"]["l1"] for r in mine}),
            "displacement": sm.radius_dependence(
                {r["radius"]: r["displacement"]["l1"] for r in mine}
            ),
        }
    payload = {
        "protocol": name,
        "config": dataclasses.asdict(base),
        "lr": lr0,
        "factors": list(factors),
        "rows": rows,
        "summary": summary,
    }
    (out / "radius-check.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    plot_radius_check(payload, out / "radius-check.png")
    text = format_radius_check(payload)
    (out / "radius-check.md").write_text(text + "\n")
    return {"table": text, "report": str(out / "radius-check.md"), "payload": payload}


def format_radius_check(payload: dict[str, Any]) -> str:
    """The radius check as Markdown: per role and radius, both estimates; then the slopes."""
    lines = [
        f"# Radius check: protocol `{payload['protocol']}`, lr x {payload['factors']}",
        "",
        "| role | lr factor | radius t | trajectory L1 [90% boot] | L1 * t | displacement L1 "
        "[90% boot] | L1 * t | displacement L1 by s (x t) | final val loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        t, tr, dp = r["radius"], r["trajectory"]["l1"], r["displacement"]["l1"]
        by_s = ", ".join(f"{s:g}: {_fmt(v, 3)}" for s, v in r["displacement_by_scale"].items())
        lines.append(
            f"| {r['role']} | {r['factor']:g} | {_fmt(t, 3)} | {_fmt(tr, 4)} "
            f"{_interval(r['trajectory_boot'], 'l1')} | {_fmt(tr * t if tr else None, 3)} | "
            f"{_fmt(dp, 4)} {_interval(r['displacement_boot'], 'l1')} | "
            f"{_fmt(dp * t if dp else None, 3)} | {by_s} | {_fmt(r['val_loss'])} |"
        )
    lines += [
        "",
        "Slope of log L1 against log t across the runs (-1: the estimate follows the radius; "
        "0: it does not):",
        "",
        "| role | trajectory slope | flag | displacement slope | flag |",
        "|---|---|---|---|---|",
    ]
    for role, s in payload["summary"].items():
        tr, dp = s["trajectory"], s["displacement"]
        lines.append(
            f"| {role} | {_fmt(tr['slope'], 3)} | {tr['flag']} | {_fmt(dp['slope'], 3)} | "
            f"{dp['flag']} |"
        )
    return "\n".join(lines)


def plot_radius_check(payload: dict[str, Any], path: Path) -> Path:
    """``L1`` against the radius ``t`` per role, log-log, for both estimates.

    A dashed line of slope -1 through the first trajectory point shows what "the estimate only
    follows the radius" looks like.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    roles = list(dict.fromkeys(r["role"] for r in payload["rows"]))
    fig, axes = plt.subplots(1, len(roles), figsize=(3.3 * len(roles), 3.4), squeeze=False)
    for ax, role in zip(axes[0], roles, strict=True):
        rows = [r for r in payload["rows"] if r["role"] == role]
        for key, style, label in (
            ("trajectory", "o-", "trajectory (consecutive minibatches)"),
            ("displacement", "s-", "displacement (fixed batch)"),
        ):
            pts = [(r["radius"], r[key]["l1"]) for r in rows if r[key]["l1"]]
            if pts:
                ts, l1s = zip(*pts, strict=True)
                ax.plot(ts, l1s, style, label=label)
        known = [(r["radius"], r["trajectory"]["l1"]) for r in rows if r["trajectory"]["l1"]]
        if known:
            t0, l0 = known[0]
            radii = [r["radius"] for r in rows]
            ax.plot(radii, [l0 * t0 / t for t in radii], "k--", lw=0.8, label="slope -1")
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):  # minor labels of a short log range overlap
            axis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("radius t = lr * scale")
        ax.set_title(role)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("fitted L1")
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"protocol {payload['protocol']}: L1 against the probing radius", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
