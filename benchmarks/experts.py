"""Step time of one mixture-of-experts layer: batched experts against a loop and torch.optim.Muon.

Run with ``make bench-experts`` (or ``python benchmarks/experts.py --json out.json``). One
layer of ``E`` experts, ``gate_up_proj`` ``(E, 2 d_ff, d)`` and ``down_proj`` ``(E, d, d_ff)``,
with fixed gradients, and four ways to take a Muon step on it, all measured in this run:

* ``batched``: ``go.muon`` on the two stacks with ``blocks="experts"``: every expert's
  Newton–Schulz in one batched call per stack;
* ``loop``: ``go.muon`` on ``2 E`` separate matrices with ``foreach=False`` (one
  Newton–Schulz call per matrix, a Python loop);
* ``torch``: ``torch.optim.Muon`` on the same ``2 E`` matrices (its own per-matrix loop);
* ``ns``: ``E`` standalone Newton–Schulz calls of each of the two shapes, with no optimizer
  around them: what one expert's matrices cost alone.

It prints the time per expert of each and the ratios ``batched / ns``, ``loop / batched`` and
``torch / batched``. Times are medians of ``--repeats`` steps after ``--warmup``; the machine,
threads and load are recorded with them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import gluon_optim as go
from gluon_optim.lab.bench.timing import load_average, machine_meta, quartiles
from gluon_optim.polar import newton_schulz


def _median(fn: Callable[[], object], warmup: int, repeats: int) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def measure(experts: int, d: int, d_ff: int, warmup: int, repeats: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(2 * d_ff, d), (d, d_ff)]
    stacks = [nn.Parameter(torch.randn(experts, *s, generator=gen) * 0.02) for s in shapes]
    grads = [torch.randn(experts, *s, generator=gen) for s in shapes]
    for p, g in zip(stacks, grads, strict=True):
        p.grad = g
    mats = [nn.Parameter(m.clone()) for p in stacks for m in p.detach().unbind(0)]
    for m, g in zip(mats, [g for gs in grads for g in gs.unbind(0)], strict=True):
        m.grad = g.clone()
    twins = [nn.Parameter(m.detach().clone()) for m in mats]
    for t, m in zip(twins, mats, strict=True):
        t.grad = m.grad.clone()  # type: ignore[union-attr]

    batched = go.muon(stacks, lr=0.02, blocks="experts")
    loop = go.muon(mats, lr=0.02, foreach=False)
    peer = torch.optim.Muon(twins, lr=0.02, weight_decay=0.0, adjust_lr_fn="original")
    samples = [torch.randn(s, generator=gen) for s in shapes]

    def standalone() -> None:
        # E calls per shape, so the bare Newton–Schulz runs as many times as in one step.
        for _ in range(experts):
            for x in samples:
                newton_schulz(x, steps=5, dtype=torch.bfloat16)

    rows: dict[str, dict[str, Any]] = {}
    for name, fn in [
        ("batched", batched.step),
        ("loop", loop.step),
        ("torch", peer.step),
        ("ns", standalone),
    ]:
        median, times = _median(fn, warmup, repeats)
        q1, q3 = quartiles(times)
        rows[name] = {
            "median_s": median,
            "q1_s": q1,
            "q3_s": q3,
            "per_expert_ms": 1e3 * median / experts,
        }
    per = {k: v["per_expert_ms"] for k, v in rows.items()}
    return {
        "experts": experts,
        "d": d,
        "d_ff": d_ff,
        "rows": rows,
        "batched_over_ns": per["batched"] / per["ns"],
        "loop_over_batched": per["loop"] / per["batched"],
        "torch_over_batched": per["torch"] / per["batched"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--d", type=int, default=256, help="model width (default %(default)s)")
    parser.add_argument("--d-ff", type=int, default=128, help="expert width (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = machine_meta(args.threads, warmup=args.warmup, repeats=args.repeats)
    result = measure(args.experts, args.d, args.d_ff, args.warmup, args.repeats)
    meta["loadavg_end"] = load_average()
    print(
        f"{args.experts} experts, gate_up_proj ({2 * args.d_ff}, {args.d}), down_proj "
        f"({args.d}, {args.d_ff}); torch {meta['torch']}, {meta['threads']} threads, median of "
        f"{args.repeats} after {args.warmup}; load {meta['loadavg_start']} -> "
        f"{meta['loadavg_end']}"
    )
    print(f"{'way':8s} {'ms per expert':>14s}")
    for name, row in result["rows"].items():
        print(f"{name:8s} {row['per_expert_ms']:14.3f}")
    print(
        f"batched / standalone NS: {result['batched_over_ns']:.3f}; loop / batched: "
        f"{result['loop_over_batched']:.2f}; torch.optim.Muon / batched: "
        f"{result['torch_over_batched']:.2f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, **result}, f, indent=2)


if __name__ == "__main__":
    main()
