"""The ``gluon-optim`` command line: demo, train, compare, sweep, smoothness, bench, plot.

Every command writes a run folder (``runs/<time>-<what>/`` unless ``--out`` says otherwise) with
the resolved configuration, the parameter-group table, the code version, JSONL metrics and, for
comparisons, ``report.md`` and PNG plots. Run ``gluon-optim COMMAND --help`` for the options.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gluon_optim.lab import experiments, report
from gluon_optim.lab.optimizers import OPTIMIZERS
from gluon_optim.lab.train import SCHEDULES, RunConfig, train

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


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _pairs(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key] = _value(value)
    return out


def _csv(text: str, kind: type = str) -> list[Any]:
    return [kind(x) for x in text.split(",") if x.strip()]


def _default_out(what: str) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{what}"


def _add_run_options(p: argparse.ArgumentParser) -> None:
    d = RunConfig()
    g = p.add_argument_group("run")
    g.add_argument(
        "--model",
        default=d.model,
        help="model preset: gpt-tiny, gpt-small, gpt2-124m, cnn-small, vit-tiny "
        "(default %(default)s)",
    )
    g.add_argument(
        "--data",
        default=d.data,
        help="data: stdlib (Python's own sources as bytes), text:PATH (file or folder), "
        "shards:TRAIN_GLOB,VAL_GLOB (nanoGPT .bin), digits, cifar10:PATH "
        "(default %(default)s)",
    )
    g.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate; default: the optimizer's tuned default for the model",
    )
    g.add_argument(
        "--opt",
        action="append",
        metavar="KEY=VALUE",
        help="optimizer option, repeatable; VALUE is JSON if it parses "
        "(--opt momentum=0.95 --opt 'scales={\"hidden\": 30}')",
    )
    g.add_argument(
        "--model-opt",
        action="append",
        metavar="KEY=VALUE",
        help="model config override, repeatable (--model-opt n_layer=4 --model-opt tied=true)",
    )
    g.add_argument(
        "--steps", type=int, default=d.steps, help="optimizer steps (default %(default)s)"
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="sequences or images per micro-batch; <= 0: full batch for images "
        "(default %(default)s)",
    )
    g.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="tokens per sequence (default: the model's context length)",
    )
    g.add_argument(
        "--grad-accum",
        type=int,
        default=d.grad_accum,
        help="micro-batches per step (default %(default)s)",
    )
    g.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=d.schedule,
        help="lr schedule: constant, wsd (warmup-stable-decay), cosine (default %(default)s)",
    )
    g.add_argument("--warmup", type=int, default=d.warmup, help="linear warmup steps (default 0)")
    g.add_argument(
        "--decay-frac",
        type=float,
        default=d.decay_frac,
        help="wsd: fraction of steps in the final linear decay (default %(default)s)",
    )
    g.add_argument(
        "--eval-every",
        type=int,
        default=d.eval_every,
        help="validation every N steps, and at the end (default %(default)s)",
    )
    g.add_argument(
        "--eval-batches",
        type=int,
        default=d.eval_batches,
        help="validation batches for text data (default %(default)s)",
    )
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=d.checkpoint_every,
        help="checkpoint every N steps (0: only at the end; default %(default)s)",
    )
    g.add_argument(
        "--radius",
        choices=("constant", "l0l1", "theory_decay"),
        default=None,
        help="radius policy of the Gluon-family optimizers (Gluon Theorems 1 and 2)",
    )
    g.add_argument(
        "--fit",
        metavar="FILE",
        default=None,
        help="gluon optimizer: take each role's (L0, L1) from FILE (fits-role.json written by "
        "`gluon-optim smoothness`) and use the l0l1 radius; lr then defaults to 1",
    )
    g.add_argument(
        "--probe-every",
        type=int,
        default=0,
        help="measure layer-wise smoothness every N steps into smoothness.jsonl (Gluon optimizers)",
    )
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    g.add_argument(
        "--data-cache",
        default=None,
        help="cache folder for the tokenised corpus (default $GLUON_OPTIM_CACHE or "
        "~/.cache/gluon-optim)",
    )
    g.add_argument("--quiet", action="store_true", help="no progress output")


def _config(args: argparse.Namespace, **overrides: Any) -> RunConfig:
    opt_options = _pairs(args.opt, "--opt")
    if getattr(args, "fit", None):
        opt_options["fit"] = args.fit
    if getattr(args, "radius", None):
        opt_options["radius"] = args.radius
    config = RunConfig(
        model=args.model,
        data=args.data,
        optimizer=getattr(args, "optimizer", "unscion"),
        lr=args.lr,
        opt_options=opt_options,
        model_options=_pairs(args.model_opt, "--model-opt"),
        steps=args.steps,
        batch_size=args.batch_size,
        block_size=args.block_size,
        grad_accum=args.grad_accum,
        schedule=args.schedule,
        warmup=args.warmup,
        decay_frac=args.decay_frac,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        checkpoint_every=args.checkpoint_every,
        seed=getattr(args, "seed", 0),
        probe_every=getattr(args, "probe_every", 0),
        threads=args.threads,
        data_cache=args.data_cache,
    )
    config = dataclasses.replace(config, **overrides)
    config.validate()
    return config


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume:
        result = train(RunConfig(), args.resume, resume=True, progress=not args.quiet)
        out = Path(args.resume)
    else:
        out = Path(args.out) if args.out else _default_out(f"{args.model}-{args.optimizer}")
        if (out / "checkpoint.pt").exists():
            raise SystemExit(f"{out} already holds a run; use --resume {out} or another --out")
        result = train(_config(args), out, progress=not args.quiet)
    acc = "" if result.final_val_accuracy is None else f", val acc {result.final_val_accuracy:.4f}"
    print(f"final val loss {result.final_val_loss:.4f}{acc}, {result.train_time_s:.1f} s")
    print(f"run folder: {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else _default_out(f"compare-{args.model}")
    res = experiments.compare(
        _config(args),
        _csv(args.optimizers),
        _csv(args.seeds, int),
        out,
        progress=not args.quiet,
        target_loss=args.target_loss,
    )
    print(res["table"])
    print(f"\nreport: {res['report']}\nplot:   {res['plot']}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else _default_out(f"sweep-{args.model}")
    res = experiments.sweep(
        _config(args),
        _csv(args.optimizers),
        _csv(args.lrs, float) if args.lrs else None,
        out,
        lr_factors=_csv(args.lr_factors, float),
        seeds=_csv(args.seeds, int),
        progress=not args.quiet,
    )
    print(res["table"])
    for name, point in res["best"].items():
        print(f"best {name}: lr {point['lr']:.3g} (val loss {point['val_loss']:.4f})")
    print(f"\nresults: {out / 'sweep.md'}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    groups: dict[str, list[str]] = {}
    for run in args.runs:
        cfg_path = Path(run) / "config.json"
        if not cfg_path.exists():
            raise SystemExit(f"{run} is not a run folder (no config.json)")
        label = json.loads(cfg_path.read_text())["config"]["optimizer"]
        groups.setdefault(label, []).append(run)
    out = report.plot_runs(groups, args.out, args.title or "")
    print(f"plot: {out}")
    return 0


def cmd_smoothness(args: argparse.Namespace) -> int:
    from gluon_optim.lab import smoothness as lab_smoothness

    out = Path(args.out) if args.out else _default_out("smoothness")
    factors = tuple(_csv(args.sweep, float)) if args.sweep else ()
    for name in _csv(args.protocols):
        overrides: dict[str, Any] = {"threads": args.threads, "data_cache": args.data_cache}
        if args.steps:
            overrides["steps"] = args.steps
        if args.every:
            overrides["probe_every"] = args.every
        if args.data and name == "cnn":
            overrides["data"] = args.data
        if args.model_opt:
            overrides["model_options"] = {
                **lab_smoothness.PROTOCOLS[name].model_options,
                **_pairs(args.model_opt, "--model-opt"),
            }
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
            base = dataclasses.replace(
                lab_smoothness.PROTOCOLS[name], **{**overrides, "probe_every": 0}
            )
            theory = f"gluon@1.0:fit={res['fits_role']}"
            cmp = experiments.compare(
                base,
                [base.optimizer, theory],
                _csv(args.seeds, int),
                out / name / "train",
                progress=not args.quiet,
                title=f"tuned {base.optimizer} vs Gluon with fitted l0l1 radii ({name})",
            )
            print(cmp["table"])
            print(f"report: {cmp['report']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else _default_out("demo")
    config = dataclasses.replace(DEMO_CONFIG, threads=args.threads, data_cache=args.data_cache)
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
    parser = argparse.ArgumentParser(
        prog="gluon-optim",
        description="Layer-wise LMO optimizers (Gluon, Muon, Scion): train, compare and sweep "
        "on offline data.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    names = ", ".join(f"{k} ({v.help})" for k, v in OPTIMIZERS.items())

    p = sub.add_parser(
        "demo", help="AdamW vs Muon vs unconstrained Scion on gpt-tiny (a few minutes on a CPU)"
    )
    p.add_argument("--out", help="output folder (default runs/<time>-demo)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--data-cache", default=None, help="cache folder for the tokenised corpus")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train one model with one optimizer")
    _add_run_options(p)
    p.add_argument("--optimizer", default="unscion", choices=sorted(OPTIMIZERS), help=names)
    p.add_argument("--seed", type=int, default=0, help="seed for init and data order (default 0)")
    p.add_argument("--out", help="run folder (default runs/<time>-<model>-<optimizer>)")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue RUN_DIR from its last checkpoint (other options are read from it)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="several optimizers x seeds on one configuration")
    _add_run_options(p)
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
    _add_run_options(p)
    p.add_argument("--optimizers", default="adamw,muon,unscion", help="comma-separated names")
    p.add_argument(
        "--lrs", default="", help="absolute lr grid, comma-separated (overrides --lr-factors)"
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
    p.add_argument("--steps", type=int, default=0, help="override the protocol's steps")
    p.add_argument("--every", type=int, default=0, help="override the probe cadence")
    p.add_argument(
        "--data", default=None, help="cnn protocol data, e.g. cifar10:PATH (default digits)"
    )
    p.add_argument(
        "--model-opt",
        action="append",
        metavar="KEY=VALUE",
        help="model override, e.g. for the 124M shape on a GPU",
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
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--data-cache", default=None, help="cache folder for the tokenised corpus")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_smoothness)

    sub.add_parser(
        "bench",
        help="time one optimizer step of ours and the peers on nanoGPT matrix shapes, with "
        "orthogonalisation error and state bytes (gluon-optim bench --help)",
    )

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
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as err:
        print(f"gluon-optim {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
