"""The training-step benchmark: tokens per second of whole lab training steps.

:func:`bench_train` times forward, backward and optimizer step of a lab GPT preset for
optimizers of the lab registry (:mod:`gluon_optim.lab.optimizers`), with the optimizer step's
share of the step.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from gluon_optim.lab import optimizers as optim_registry
from gluon_optim.lab.bench.timing import conditions, fmt, load_average, machine_meta, quartiles
from gluon_optim.lab.data import TokenDataset, load_data
from gluon_optim.lab.models import GPTConfig, build_model, model_config, model_task
from gluon_optim.lab.train import RunConfig, batch_loss, needs_closure, state_bytes

#: The lab optimizers :func:`bench_train` compares by default (names of the lab registry).
TRAIN_OPTIMIZERS: tuple[str, ...] = ("adamw", "torch-muon", "muon", "muon-fast", "scion")

#: The keywords of :func:`bench_train` that are a lab run's settings: RunConfig fields of the same
#: name and meaning, whose defaults they take and from which ``gluon-optim bench`` generates
#: its options.
RUN_SETTINGS: tuple[str, ...] = ("model", "data", "batch_size", "seed", "threads")

_RUN = RunConfig()


def check_train_args(
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
    model: str = _RUN.model,
    steps: int = 20,
    warmup: int = 3,
    batch_size: int = _RUN.batch_size,
    seq_len: int | None = None,
    threads: int | None = _RUN.threads,
    seed: int = _RUN.seed,
    data: str = _RUN.data,
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
    check_train_args(optimizers, model, steps, warmup, batch_size, seq_len, threads)
    options = dict(model_options or {})
    seq_len = _seq_len(model, options, seq_len)
    if threads is not None:
        torch.set_num_threads(threads)
    dataset = load_data(data, cache_dir=data_cache)
    if not isinstance(dataset, TokenDataset):
        raise ValueError(f"bench_train: data {data!r} is not a text data set")
    runs, n_params = _build_runs(optimizers, model, options, dataset.vocab_size, seed)
    meta = machine_meta(
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
            _timed_step(run, x, y, timed=k >= warmup)
    tokens = batch_size * seq_len
    rows = [_train_row(run, tokens, n_params) for run in runs]
    meta["loadavg_end"] = load_average()
    return {"meta": meta, "rows": rows}


def _seq_len(model: str, options: dict[str, Any], seq_len: int | None) -> int:
    """``seq_len``, or the model's ``block_size`` for ``None``; never more than that."""
    config = model_config(model, **options)
    assert isinstance(config, GPTConfig)  # model_task(model) == "lm"
    if seq_len is None:
        return config.block_size
    if seq_len > config.block_size:
        raise ValueError(
            f"bench_train: invalid seq_len: {seq_len} exceeds {model}'s block_size "
            f"{config.block_size}"
        )
    return seq_len


def _build_runs(
    optimizers: Sequence[str], model: str, options: dict[str, Any], vocab_size: int, seed: int
) -> tuple[list[_TrainRun], int]:
    """One seeded model per optimizer (the same start for all) and the parameter count."""
    runs: list[_TrainRun] = []
    n_params = 0
    for name in optimizers:
        torch.manual_seed(seed)
        net = build_model(model, vocab_size=vocab_size, **options)
        n_params = sum(p.numel() for p in net.parameters())
        lr, opt_options = optim_registry.resolve(name, model, None, {})
        opts = optim_registry.build(name, net, lr, opt_options)
        net.train()
        runs.append(_TrainRun(name, lr, net, opts, needs_closure(opts), [], [], []))
    return runs, n_params


def _timed_step(run: _TrainRun, x: Tensor, y: Tensor, *, timed: bool) -> None:
    t0 = time.perf_counter()
    t1 = _train_step(run, x, y)
    t2 = time.perf_counter()
    if timed:
        run.step_ms.append((t2 - t0) * 1e3)
        if t1 is not None:
            run.opt_ms.append((t2 - t1) * 1e3)


def _train_step(run: _TrainRun, x: Tensor, y: Tensor) -> float | None:
    """One training step of ``run``; returns when the optimizer part began (``None``: two-point)."""

    def closure() -> Tensor:
        for opt in run.optimizers:
            opt.zero_grad(set_to_none=True)
        loss = batch_loss(run.model, x, y)
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


def _train_row(run: _TrainRun, tokens: int, n_params: int) -> dict[str, Any]:
    median = statistics.median(run.step_ms)
    q1, q3 = quartiles(run.step_ms)
    opt_median = statistics.median(run.opt_ms) if run.opt_ms else None
    return {
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


def format_train_table(result: dict[str, Any]) -> str:
    """A markdown table of a :func:`bench_train` result."""
    meta = result["meta"]
    lines = [
        f"Training step of {meta['model']} ({meta['n_params']:,} parameters) on {meta['data']}, "
        f"batch {meta['batch_size']} x {meta['seq_len']} tokens, {conditions(meta, meta['steps'])}",
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
            f"| {fmt(r['opt_median_ms'], '.2f')} | {share} "
            f"| {r['state_bytes_per_param']:.1f} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} |"
        )
    return "\n".join(lines)
