"""The ``gluon-optim`` command line: demo, train, compare, sweep, smoothness, bench, plot.

Every command writes a run folder (``runs/<time>-<what>/`` unless ``--out`` says otherwise) with
the resolved configuration, the parameter-group table, the code version, JSONL metrics and, for
comparisons, ``report.md`` and PNG plots. Run ``gluon-optim COMMAND --help`` for the options.
Every error is one line on stderr with exit status 2; one about a run folder read back (a
damaged ``config.json``, checkpoint or log) names the file and leaves the folder as it was.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gluon_optim.lab import experiments, report
from gluon_optim.lab.optimizers import OPTIMIZERS
from gluon_optim.lab.options import (
    add_config_options,
    config_from_args,
    config_overrides,
    count,
    csv_values,
    flag_of,
    nonnegative,
    run_fields,
)
from gluon_optim.lab.train import ConfigError, RunConfig, read_run_config, train
from gluon_optim.lab.usage import Parser, UsageError, print_error

#: `make demo`: gpt-tiny on the standard-library corpus, the three optimizers the papers compare.
DEMO_OPTIMIZERS = ("adamw", "muon", "unscion")
DEMO_CONFIG = RunConfig(
    model="gpt-tiny",
    data="stdlib",
    steps=300,
    batch_size=16,
    eval_every=50,
    eval_batches=8,
    schedule="wsd",
    decay_frac=0.3,
)
DEMO_SEEDS = (0, 1, 2)


def _default_out(what: str) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{what}"


def _add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress output")


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume:
        changed = config_overrides(args, RunConfig())
        other = sorted(flag_of(name) for name in changed if name != "steps")
        if other:
            raise UsageError(
                "--resume",
                "continues the saved configuration; only --steps may change (got "
                f"{', '.join(other)})",
            )
        result = train(
            RunConfig(),
            args.resume,
            resume=True,
            progress=not args.quiet,
            steps=changed.get("steps"),
        )
        out = Path(args.resume)
    else:
        config = config_from_args(args)
        if config.parallel != "none" and not args.out:
            # Each process would pick its own timestamped default folder.
            raise UsageError(
                "--parallel", f"{config.parallel} needs --out (one folder for all ranks)"
            )
        out = Path(args.out) if args.out else _default_out(f"{config.model}-{config.optimizer}")
        if (out / "checkpoint.pt").exists():
            raise UsageError(
                "--out", f"{out} already holds a run; use --resume {out} or another --out"
            )
        result = train(config, out, progress=not args.quiet)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return 0
    acc = "" if result.final_val_accuracy is None else f", val acc {result.final_val_accuracy:.4f}"
    print(f"final val loss {result.final_val_loss:.4f}{acc}, {result.train_time_s:.1f} s")
    print(f"run folder: {out}")
    return 0


def _nonempty(option: str, text: str) -> str:
    if not csv_values(text):
        raise UsageError(option, "give at least one value (comma-separated)")
    return text


def _optimizer_specs(text: str, *, allow_lr: bool = True) -> list[str]:
    """``--optimizers``: specs ``name[@lr][:key=value]...`` whose names exist."""
    specs = csv_values(_nonempty("--optimizers", text))
    for spec in specs:
        try:
            name, lr, _ = experiments.parse_spec(spec)
        except ValueError as err:
            raise UsageError("--optimizers", str(err)) from None
        if lr is not None and not allow_lr:
            raise UsageError("--optimizers", f"{spec!r} gives an lr; the grid (--lrs) sets it")
        if name not in OPTIMIZERS:
            raise UsageError("--optimizers", f"unknown optimizer {name!r}").with_valid(
                ", ".join(sorted(OPTIMIZERS))
            )
    return specs


def cmd_compare(args: argparse.Namespace) -> int:
    specs = _optimizer_specs(args.optimizers)
    seeds = csv_values(_nonempty("--seeds", args.seeds), int, "--seeds")
    config = config_from_args(args)
    out = Path(args.out) if args.out else _default_out(f"compare-{config.model}")
    res = experiments.compare(
        config,
        specs,
        seeds,
        out,
        progress=not args.quiet,
        target_loss=args.target_loss,
    )
    print(res["table"])
    print(f"\nreport: {res['report']}\nplot:   {res['plot']}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    specs = _optimizer_specs(args.optimizers, allow_lr=False)
    seeds = csv_values(_nonempty("--seeds", args.seeds), int, "--seeds")
    if args.lrs is not None and not csv_values(args.lrs):
        raise UsageError("--lrs", "give at least one lr, or leave --lrs out to use --lr-factors")
    lrs = csv_values(args.lrs, float, "--lrs") if args.lrs is not None else None
    factors = csv_values(_nonempty("--lr-factors", args.lr_factors), float, "--lr-factors")
    config = config_from_args(args)
    out = Path(args.out) if args.out else _default_out(f"sweep-{config.model}")
    res = experiments.sweep(
        config,
        specs,
        lrs,
        out,
        lr_factors=factors,
        seeds=seeds,
        progress=not args.quiet,
    )
    print(res["table"])
    for name, point in res["best"].items():
        print(f"best {name}: lr {point['lr']:.3g} (val loss {point['val_loss']:.4f})")
    print(f"\nresults: {out / 'sweep.md'}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    configs = []
    for run in args.runs:
        cfg_path = Path(run) / "config.json"
        if not cfg_path.exists():
            raise UsageError("runs", f"{run} is not a run folder (no config.json)")
        saved, config = read_run_config(run)
        configs.append({**dataclasses.asdict(config), "lr": saved.get("lr", config.lr)})
    groups: dict[str, list[str]] = {}
    for run, label in zip(args.runs, report.run_labels(configs), strict=True):
        groups.setdefault(label, []).append(run)
    out = report.plot_runs(groups, args.out, args.title or "")
    print(f"plot: {out}")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    for option, run in (("run_a", args.run_a), ("run_b", args.run_b)):
        if not (Path(run) / "metrics.jsonl").is_file():
            raise UsageError(option, f"{run} is not a run folder (no metrics.jsonl)")
    d = report.compare_runs(args.run_a, args.run_b)
    if d["max_param_diff"] == 0.0 and d["first_diff_step"] is None:
        print(f"same: losses equal bit for bit over {d['steps']} steps; final weights equal")
        return 0
    where = f", first at step {d['first_diff_step']}" if d["first_diff_step"] else ""
    print(
        f"differ: max |loss difference| {d['max_loss_diff']:.3g} over {d['steps']} steps{where}; "
        f"max |weight difference| {d['max_param_diff']:.3g}"
    )
    return 0 if d["max_loss_diff"] <= args.tolerance else 1


def cmd_smoothness(args: argparse.Namespace) -> int:
    from gluon_optim.lab import smoothness as lab_smoothness

    out = Path(args.out) if args.out else _default_out("smoothness")
    factors = tuple(csv_values(args.sweep, float, "--sweep")) if args.sweep else ()
    names = csv_values(args.protocols)
    unknown = [n for n in names if n not in lab_smoothness.PROTOCOLS]
    if unknown or not names:
        raise UsageError(
            "--protocols",
            f"unknown protocol(s) {unknown}" if unknown else "give at least one protocol",
        ).with_valid(sorted(lab_smoothness.PROTOCOLS))
    check = csv_values(args.radius_check, float, "--radius-check") if args.radius_check else []
    if args.radius_check and not all(f > 0 and math.isfinite(f) for f in check):
        raise UsageError("--radius-check", f"lr factors must be > 0, got {args.radius_check!r}")

    def overrides_for(name: str) -> dict[str, Any]:
        overrides = config_overrides(args, lab_smoothness.PROTOCOLS[name])
        if args.steps:
            overrides["steps"] = args.steps
        if args.every:
            overrides["probe_every"] = args.every
        if args.data and name == "cnn":
            overrides["data"] = args.data
        return overrides

    if check:
        for name in names:
            res = lab_smoothness.radius_check(
                name,
                out / name / "radius-check",
                tuple(check),
                overrides=overrides_for(name),
                progress=not args.quiet,
            )
            print(f"\n== {name} ==\n{res['table']}\nreport: {res['report']}")
        return 0
    for name in names:
        overrides = overrides_for(name)
        res = lab_smoothness.run_protocol(
            name,
            out / name,
            overrides=overrides,
            sweep_factors=factors,
            progress=not args.quiet,
        )
        print(f"\n== {name} ==")
        print(lab_smoothness.format_radii(res["radii"]))
        print(f"report: {res['report']}\nfits:   {res['fits_role']}")
        if args.then_train:
            base = lab_smoothness.protocol_config(name, {**overrides, "probe_every": 0})
            theory = f"gluon@1.0:fit={res['fits_role']}"
            cmp = experiments.compare(
                base,
                [base.optimizer, theory],
                csv_values(args.seeds, int, "--seeds"),
                out / name / "train",
                progress=not args.quiet,
                title=f"tuned {base.optimizer} vs Gluon with fitted l0l1 radii ({name})",
            )
            print(cmp["table"])
            print(f"report: {cmp['report']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else _default_out("demo")
    config = config_from_args(args, DEMO_CONFIG)
    print(
        f"gluon-optim demo: {config.model} on Python's standard library as bytes, "
        f"{config.steps} steps x batch {config.batch_size}, "
        f"optimizers {', '.join(DEMO_OPTIMIZERS)}, seeds {list(DEMO_SEEDS)}",
        flush=True,
    )
    res = experiments.compare(
        config,
        DEMO_OPTIMIZERS,
        DEMO_SEEDS,
        out,
        progress=not args.quiet,
        title="gluon-optim demo: gpt-tiny on the standard-library corpus",
    )
    print()
    print(res["table"])
    print(f"\nreport: {res['report']}\nplot:   {res['plot']}\nruns:   {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="gluon-optim",
        description="Layer-wise LMO optimizers (Gluon, Muon, Scion): train, compare and sweep "
        "on offline data.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    names = ", ".join(f"{k} ({v.help})" for k, v in OPTIMIZERS.items())
    machine = ("threads", "data_cache")

    p = sub.add_parser(
        "demo", help="AdamW vs Muon vs unconstrained Scion on gpt-tiny (a few minutes on a CPU)"
    )
    p.add_argument("--out", help="output folder (default runs/<time>-demo)")
    add_config_options(p, machine, base=DEMO_CONFIG)
    _add_quiet(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train one model with one optimizer")
    add_config_options(p, run_fields(), base=RunConfig(), title="run")
    _add_quiet(p)
    p.add_argument("--out", help="run folder (default runs/<time>-<model>-<optimizer>)")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue RUN_DIR from its last checkpoint (other options are read from it)",
    )
    p.set_defaults(func=cmd_train)

    # --optimizer, --lr and --seed are per run here: --optimizers name@lr and --seeds.
    p = sub.add_parser("compare", help="several optimizers x seeds on one configuration")
    add_config_options(p, run_fields(varied=False), base=RunConfig(), title="run")
    _add_quiet(p)
    p.add_argument(
        "--optimizers",
        default="adamw,muon,unscion",
        help="comma-separated specs name[@lr][:key=value]..., e.g. unscion@0.0005 or "
        "limuon:rank=4 (default %(default)s). Names: " + names,
    )
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default %(default)s)")
    p.add_argument(
        "--target-loss",
        type=float,
        default=None,
        help="also report the steps and gradient evaluations to reach this validation loss",
    )
    p.add_argument("--out", help="output folder (default runs/<time>-compare-<model>)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("sweep", help="learning-rate grid per optimizer, same budget for each")
    add_config_options(p, run_fields(varied=False), base=RunConfig(), title="run")
    _add_quiet(p)
    p.add_argument(
        "--optimizers",
        default="adamw,muon,unscion",
        help="comma-separated names or specs name[:key=value]... (no @lr: the grid sets it), "
        "e.g. unscion:momentum=0.8,unscion:momentum=0.95 (default %(default)s)",
    )
    p.add_argument(
        "--lrs", default=None, help="absolute lr grid, comma-separated (overrides --lr-factors)"
    )
    p.add_argument(
        "--lr-factors",
        default="0.25,0.5,1,2,4",
        help="grid as multiples of each optimizer's tuned default (default %(default)s)",
    )
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default %(default)s)")
    p.add_argument("--out", help="output folder (default runs/<time>-sweep-<model>)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "smoothness",
        help="the Gluon paper's layer-wise (L0, L1)-smoothness experiments (GPT and CNN)",
    )
    p.add_argument(
        "--protocols",
        default="gpt,cnn",
        help="gpt (tied gpt-tiny, unconstrained Scion, constant lr, beta 0.9) and/or cnn "
        "(cnn-small on digits, full batch, no momentum) (default %(default)s)",
    )
    # A protocol's own overrides: 0 or no value keeps the protocol's, --data is the CNN's only.
    p.add_argument("--steps", type=count(1), default=None, help="override the protocol's steps")
    p.add_argument("--every", type=count(1), default=None, help="override the probe cadence")
    p.add_argument(
        "--data", default=None, help="cnn protocol data, e.g. cifar10:PATH (default digits)"
    )
    add_config_options(p, ("model_options", *machine), base=None)
    p.add_argument(
        "--radius-check",
        default="",
        help="instead of the protocol: run it at these lr factors (e.g. 0.25,1,4) with the "
        "trajectory and the controlled-displacement probes, and report L1 * t per role and "
        "whether L1 follows 1/t",
    )
    p.add_argument(
        "--sweep",
        default="0.25,0.5,1,2,4",
        help="lr factors of a same-budget sweep for the 'swept' radii; '' to skip "
        "(default %(default)s)",
    )
    p.add_argument(
        "--then-train",
        action="store_true",
        help="afterwards compare the tuned optimizer with Gluon at the fitted radii",
    )
    p.add_argument("--seeds", default="0,1,2", help="seeds for --then-train (default %(default)s)")
    p.add_argument("--out", help="output folder (default runs/<time>-smoothness)")
    _add_quiet(p)
    p.set_defaults(func=cmd_smoothness)

    sub.add_parser(
        "bench",
        help="time one optimizer step of ours and the peers on nanoGPT matrix shapes, with "
        "orthogonalisation error and state bytes (gluon-optim bench --help)",
    )

    p = sub.add_parser(
        "diff", help="compare two runs step by step (a distributed run against one process)"
    )
    p.add_argument("run_a", help="run folder")
    p.add_argument("run_b", help="run folder")
    p.add_argument(
        "--tolerance",
        type=nonnegative,
        default=0.0,
        help="largest |loss difference| that still passes (default %(default)s: bit for bit)",
    )
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("plot", help="plot loss against steps and wall-clock from run folders")
    p.add_argument("runs", nargs="+", help="run folders (runs of one optimizer are averaged)")
    p.add_argument("--out", default="loss.png", help="PNG path (default %(default)s)")
    p.add_argument("--title", default="", help="figure title")
    p.set_defaults(func=cmd_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gluon-optim`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # The benchmark has its own parser (gluon_optim.lab.bench); hand it the rest.
        from gluon_optim.lab import bench

        return bench.main(argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported for the command, not for the top-level parser
        return print_error(args.command, extra[0], f"unrecognized (gluon-optim {args.command} -h)")
    try:
        return int(args.func(args))
    except ConfigError as err:  # a run setting: name the option that set it
        return print_error(args.command, flag_of(err.field), _one_line(err))
    except UsageError as err:
        return print_error(args.command, err.option, _one_line(err))
    except (ValueError, OSError) as err:
        # Bad input, files included: a damaged run folder is a RunFolderError naming the file
        # (gluon_optim.lab.train), a missing or unreadable file an OSError.
        return print_error(args.command, "", _one_line(err))


def _one_line(err: BaseException) -> str:
    """``err``'s message on one line (its lines joined), whatever raised it."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines) or type(err).__name__


if __name__ == "__main__":
    raise SystemExit(main())
