"""``gluon-optim bench`` (also ``python -m gluon_optim.lab.bench``): run, print, write files."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gluon_optim.lab import optimizers as optim_registry
from gluon_optim.lab.bench.distributed import bench_distributed, format_distributed_table
from gluon_optim.lab.bench.scaling import bench_scaling, format_scaling_table, plot_scaling
from gluon_optim.lab.bench.step import bench_step, format_step_table
from gluon_optim.lab.bench.train import (
    RUN_SETTINGS,
    TRAIN_OPTIMIZERS,
    bench_train,
    check_train_args,
    format_train_table,
)
from gluon_optim.lab.models import model_task
from gluon_optim.lab.options import add_config_options, config_from_args, count, counts, flag_of
from gluon_optim.lab.train import ConfigError, RunConfig
from gluon_optim.lab.usage import Parser
from gluon_optim.polar import COMPILE_BACKENDS

#: The run settings every benchmark takes; the other RUN_SETTINGS are --train-* options.
_SHARED = ("threads", "seed")


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
    p = Parser(
        prog="gluon-optim bench",
        description="Time optimizer steps on nanoGPT hidden matrices and polar-factor scaling.",
    )
    p.add_argument("--widths", type=counts, default=[256, 384], help="e.g. 256,384,768")
    p.add_argument("--n-layer", type=count(1), default=6, help="blocks (default %(default)s)")
    p.add_argument("--repeats", type=count(1), default=10, help="timed steps (default %(default)s)")
    p.add_argument("--warmup", type=count(0), default=3, help="untimed steps (default %(default)s)")
    add_config_options(
        p,
        _SHARED,
        base=RunConfig(),
        helps={"seed": "seed of the random matrices, the model init and the data order"},
    )
    p.add_argument(
        "--sizes",
        type=counts,
        default=[256, 512, 1024, 2048],
        help="scaling sizes n; empty string skips the scaling benchmark",
    )
    p.add_argument(
        "--scaling-repeats", type=count(1), default=5, help="scaling repeats (default %(default)s)"
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
        "--train-steps",
        type=count(1),
        default=20,
        help="timed training steps (default %(default)s)",
    )
    p.add_argument(
        "--train-warmup",
        type=count(0),
        default=3,
        help="untimed training steps (default %(default)s)",
    )
    train = add_config_options(
        p,
        [name for name in RUN_SETTINGS if name not in _SHARED],
        base=RunConfig(),
        prefix="train-",
        helps={
            "model": "GPT preset",
            "data": "text data: stdlib, text:PATH or shards:TRAIN_GLOB,VAL_GLOB",
            "batch_size": "sequences per step",
        },
    )
    train["model"].type = _lm_model  # --train times language models only
    p.add_argument(
        "--compile",
        default="",
        choices=["", *COMPILE_BACKENDS],
        help="also time the fast Muon with torch.compile on this backend (e.g. inductor)",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="only the distributed benchmark: bytes per rank per step at W=8 and 64, owner "
        "balance, torch.optim.Muon's DTensor collectives, step time on 1 and 2 gloo processes",
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
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.error(f"argument {extra[0]}: unrecognized (gluon-optim bench -h)")
    if not args.widths:
        parser.error("argument --widths: give at least one width, e.g. 384")
    if args.distributed:
        result = bench_distributed()
        text = format_distributed_table(result)
        print(text)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "distributed.json").write_text(json.dumps(result, indent=2))
            (args.out / "distributed.md").write_text("# Distributed benchmark\n\n" + text + "\n")
            print(f"\nwrote {args.out}/distributed.json, distributed.md")
        return 0
    try:
        run = config_from_args(args)  # checked before any benchmark runs
    except ConfigError as exc:
        prefix = "" if exc.field in _SHARED else "train-"
        parser.error(f"argument {flag_of(exc.field, prefix)}: {exc}")
    if args.train:  # fail before the step benchmark, not after it
        try:
            check_train_args(
                args.train_optimizers,
                run.model,
                args.train_steps,
                args.train_warmup,
                run.batch_size,
                None,
                run.threads,
            )
        except ValueError as exc:
            parser.error(str(exc))
    results: dict[str, Any] = {"step": None, "scaling": None, "train": None}
    texts: list[str] = []
    results["step"] = bench_step(
        args.widths,
        repeats=args.repeats,
        warmup=args.warmup,
        n_layer=args.n_layer,
        threads=run.threads,
        seed=run.seed,
        compile_backend=args.compile,
    )
    _show(texts, format_step_table(results["step"]))
    if args.sizes:
        results["scaling"] = bench_scaling(
            args.sizes, repeats=args.scaling_repeats, threads=run.threads, seed=run.seed
        )
        _show(texts, format_scaling_table(results["scaling"]))
    if args.train:
        results["train"] = bench_train(
            args.train_optimizers,
            steps=args.train_steps,
            warmup=args.train_warmup,
            **{name: getattr(run, name) for name in RUN_SETTINGS},
        )
        _show(texts, format_train_table(results["train"]))
    if args.out is not None:
        _write(args.out, results, "\n\n".join(texts))
    return 0


def _show(texts: list[str], text: str) -> None:
    """Print a benchmark's table as soon as it is done (a blank line between tables)."""
    print(("\n" if texts else "") + text, flush=True)
    texts.append(text)


def _write(out: Path, results: dict[str, Any], text: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    md = "# Benchmark\n\n" + text + "\n"
    if results["scaling"] is not None:
        plot_scaling(results["scaling"], out / "scaling.png")
        md += "\n![scaling](scaling.png)\n"
    (out / "bench.md").write_text(md)
    scaling = ", scaling.png" if results["scaling"] is not None else ""
    print(f"\nwrote {out}/bench.json, bench.md" + scaling)
