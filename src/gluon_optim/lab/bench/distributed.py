"""Distributed steps: bytes per rank per step, owner balance, and step time on gloo processes.

Three measurements (``gluon-optim bench --distributed``):

* :func:`communication`: for the hidden matrices of GPT-2 124M (width 768, 12 blocks) and of a
  1.3B-style stack (width 2048, 24 blocks) at W = 8 and 64, the bytes each rank sends per
  optimizer step under ``distributed="replicated"`` (the real owner table of
  :func:`~gluon_optim.distributed.assign_owners`, padding included), against the formula's
  bound and the other schemes' formulas (ring collectives): a DDP fp32 gradient all-reduce
  (what the data-parallel wrapper already sends), gathering every full fp32 matrix, and dion's
  two bf16 all-to-alls of an FSDP2 layout. It also reports the owners' imbalance (the largest
  rank's Newton–Schulz cost over the mean). These are computed, not timed.
* :func:`torch_muon_on_dtensor`: the implicit collectives ``torch.optim.Muon`` issues per step
  on DTensor (``Shard(0)``) matrices, counted with ``CommDebugMode`` on W gloo processes.
* :func:`step_time`: the optimizer step on W gloo processes with one thread each (W = 1 and
  2), Muon on the hidden matrices of a width-384, 6-block GPT: step time and time in the
  direction stage, per rank, median of the timed steps.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gluon_optim as go
from gluon_optim.lab import parallel
from gluon_optim.lab.bench.step import gpt_shapes
from gluon_optim.lab.bench.timing import fmt, machine_meta

__all__ = [
    "SHAPE_SETS",
    "bench_distributed",
    "communication",
    "format_distributed_table",
    "step_time",
    "torch_muon_on_dtensor",
]

#: The matrix shapes of the communication table.
SHAPE_SETS: dict[str, tuple[int, int]] = {"gpt2-124m": (768, 12), "1.3b": (2048, 24)}


def communication(worlds: tuple[int, ...] = (8, 64)) -> list[dict[str, Any]]:
    """Bytes per rank per step for every shape set and world size (see the module docstring)."""
    norm = go.norms.get("spectral")
    rows = []
    for name, (width, n_layer) in SHAPE_SETS.items():
        shapes = gpt_shapes(width, n_layer)
        elements = [m * n for m, n in shapes]
        p = sum(elements)
        costs = [go.distributed.lmo_cost(norm, s, 5) for s in shapes]
        for w in worlds:
            owners = go.distributed.assign_owners(costs, w, [tuple(s) for s in shapes])
            owned = [
                sum(e for e, o in zip(elements, owners, strict=True) if o == r) for r in range(w)
            ]
            loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(w)]
            ours = (w - 1) * max(owned) * 2  # one bf16 all-gather, padded to the largest share
            sharded = go.distributed.sharded_bytes(shapes, owners, w)
            rows.append(
                {
                    "shapes": name,
                    "world": w,
                    "matrix_elements": p,
                    "ours_replicated": ours,
                    "ours_bound": (w - 1) * p * 2 / w,
                    "ours_bytes_per_element": ours / p,
                    "ddp_grad_allreduce_fp32": 2 * (w - 1) * p * 4 / w,
                    "gather_full_fp32": (w - 1) * p * 4 / w,
                    "ours_sharded_max": max(sharded),
                    "ours_sharded_mean": sum(sharded) / w,
                    "dion_fsdp2_all_to_all_bf16": 4 * (w - 1) * p / w**2,
                    "imbalance": max(loads) / (sum(loads) / w),
                }
            )
    return rows


def _dtensor_counts(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    mesh = init_device_mesh("cpu", (world,))
    out: dict[str, Any] = {}
    for label, shape in (("wide (384x1152)", (384, 1152)), ("tall (1152x384)", (1152, 384))):
        torch.manual_seed(0)
        w = nn.Parameter(distribute_tensor(torch.randn(shape), mesh, [Shard(0)]))
        opt: torch.optim.Optimizer = torch.optim.Muon([w], lr=0.02, adjust_lr_fn="original")
        w.grad = distribute_tensor(torch.randn(shape), mesh, [Shard(0)])
        opt.step()  # the first step creates the state
        with CommDebugMode() as comm:  # type: ignore[no-untyped-call]
            opt.step()
        out[label] = {str(k): v for k, v in comm.get_comm_counts().items()}
    # Ours on the same matrices, together, in one sharded step.
    torch.manual_seed(0)
    params = [
        nn.Parameter(distribute_tensor(torch.randn(shape), mesh, [Shard(0)]))
        for shape in ((384, 1152), (1152, 384))
    ]
    ours = go.muon(params)
    for p in params:
        p.grad = distribute_tensor(torch.randn(p.shape), mesh, [Shard(0)])
    ours.step()
    with CommDebugMode() as comm:  # type: ignore[no-untyped-call]
        ours.step()
    out["gluon-optim muon, both matrices (sharded)"] = {
        str(k): v for k, v in comm.get_comm_counts().items()
    }
    return out


def torch_muon_on_dtensor(world: int = 2) -> dict[str, Any]:
    """Collective counts of one ``torch.optim.Muon`` step per DTensor matrix, at ``world``."""
    with tempfile.TemporaryDirectory() as tmp:
        counts: dict[str, Any] = parallel.run(_dtensor_counts, world, Path(tmp))[0]
    return counts


_STEP_WIDTH, _STEP_LAYERS, _REPEATS, _WARMUP = 384, 6, 10, 3


def _time_steps(rank: int, world: int, sharded: bool = False) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    shapes = gpt_shapes(_STEP_WIDTH, _STEP_LAYERS)
    params = [nn.Parameter(torch.randn(*s, generator=gen) * s[1] ** -0.5) for s in shapes]
    grads = [torch.randn(*s, generator=gen) for s in shapes]
    if sharded:  # every matrix a Shard(0) DTensor, as fully_shard lays it out
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        params = [nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])) for p in params]
        grads = [distribute_tensor(g, mesh, [Shard(0)]) for g in grads]
        opt = go.muon(params)
    else:
        opt = go.muon(params, distributed="replicated" if world > 1 else "local")
    inner = opt.executor.directions
    spent: list[float] = []

    def timed(requests: Any) -> Any:
        start = time.perf_counter()
        out = inner(requests)
        spent.append(time.perf_counter() - start)
        return out

    opt.executor.directions = timed  # type: ignore[method-assign]
    steps = []
    for i in range(_WARMUP + _REPEATS):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        start = time.perf_counter()
        opt.step()
        if i >= _WARMUP:
            steps.append(time.perf_counter() - start)
    return {
        "step_ms": 1e3 * statistics.median(steps),
        "directions_ms": 1e3 * statistics.median(spent[_WARMUP:]),
    }


def _time_sharded(rank: int, world: int) -> dict[str, float]:
    return _time_steps(rank, world, sharded=True)


def step_time(worlds: tuple[int, ...] = (1, 2)) -> list[dict[str, Any]]:
    """Median optimizer-step and direction-stage time per rank, one thread per process, in
    ``"replicated"`` mode (plain tensors) and ``"sharded"`` mode (``Shard(0)`` DTensors); the
    speed-up of each is against the one-process ``"local"`` step."""
    rows = []
    for mode, fn in (("replicated", _time_steps), ("sharded", _time_sharded)):
        for w in worlds:
            with tempfile.TemporaryDirectory() as tmp:
                per_rank = parallel.run(fn, w, Path(tmp))
            step_ms = max(r["step_ms"] for r in per_rank)
            rows.append({"mode": mode, "world": w, "ranks": per_rank, "step_ms": step_ms})
    base = rows[0]["step_ms"]
    for row in rows:
        row["speedup"] = base / row["step_ms"]
    return rows


def bench_distributed() -> dict[str, Any]:
    """All three measurements, with the machine they ran on."""
    return {
        "meta": machine_meta(1, shapes_timed=f"gpt width {_STEP_WIDTH}, {_STEP_LAYERS} blocks"),
        "communication": communication(),
        "torch_muon_dtensor_collectives": torch_muon_on_dtensor(),
        "step_time": step_time(),
    }


def _mb(x: float) -> str:
    return fmt(x / 1e6, ".1f")


def format_distributed_table(result: dict[str, Any]) -> str:
    """The three measurements as Markdown tables."""
    lines = [
        "Bytes sent per rank per optimizer step (MB), hidden matrices only:",
        "",
        "| shapes | W | P | ours (replicated) | bound (W-1)/W*2P | B/element | ours (sharded): "
        "largest / mean rank | dion FSDP2 a2a 4(W-1)P/W^2 | DDP grad all-reduce | gather full "
        "fp32 | LMO imbalance |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["communication"]:
        lines.append(
            f"| {r['shapes']} | {r['world']} | {r['matrix_elements'] / 1e6:.1f}M | "
            f"{_mb(r['ours_replicated'])} | {_mb(r['ours_bound'])} | "
            f"{r['ours_bytes_per_element']:.3f} | {_mb(r['ours_sharded_max'])} / "
            f"{_mb(r['ours_sharded_mean'])} | {_mb(r['dion_fsdp2_all_to_all_bf16'])} | "
            f"{_mb(r['ddp_grad_allreduce_fp32'])} | {_mb(r['gather_full_fp32'])} | "
            f"{r['imbalance']:.3f} |"
        )
    lines += [
        "",
        "Collectives per step on DTensor `Shard(0)` matrices (W=2, CommDebugMode):",
        "",
    ]
    for label, counts in result["torch_muon_dtensor_collectives"].items():
        total = sum(counts.values())
        detail = ", ".join(f"{k.split('.')[-1]} {v}" for k, v in counts.items())
        lines.append(f"* {label}: {total} ({detail})")
    lines += [
        "",
        "Optimizer step on gloo processes, one thread each (Muon, width-384 GPT, 24 matrices):",
        "",
        "| mode | W | step ms (slowest rank) | per rank: step ms / directions ms | speed-up |",
        "|---|---:|---:|---|---:|",
    ]
    for r in result["step_time"]:
        ranks = "; ".join(f"{x['step_ms']:.1f} / {x['directions_ms']:.1f}" for x in r["ranks"])
        lines.append(
            f"| {r.get('mode', 'replicated')} | {r['world']} | {r['step_ms']:.1f} | {ranks} | "
            f"{r['speedup']:.2f}x |"
        )
    return "\n".join(lines)
