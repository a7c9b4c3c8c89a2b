"""Processes for the lab: run a function on W local gloo processes and collect the results.

:func:`run` is what the distributed tests and ``gluon-optim bench --distributed`` use: it spawns
W CPU processes joined by a gloo group over a file store (no ports), pins
``torch.set_num_threads(1)`` in each (some CPU kernels, LayerNorm's backward among them, round
differently with another thread count, and equal bits across processes need equal kernels), and
gives every process group a timeout, so a collective that one rank never reaches fails instead
of hanging. One spawn should run many cases: starting a process costs seconds on a small
machine.
"""

from __future__ import annotations

import gc
import os
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import FileStore  # type: ignore[attr-defined]
from torch.multiprocessing.spawn import start_processes

COLLECTIVE_TIMEOUT = timedelta(seconds=60)


def _worker(rank: int, world: int, tmp: str, fn: Callable[[int, int], Any]) -> None:
    torch.set_num_threads(1)
    os.environ["TORCH_COMPILE_DISABLE"] = "1"
    store = FileStore(os.path.join(tmp, "store"), world)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT
    )
    try:
        result: Any = fn(rank, world)
        # No rank may destroy the group while another is still inside a collective.
        dist.barrier()
    except BaseException:  # reported to the parent, which raises it
        result = {"error": traceback.format_exc()}
    # Objects of the cases that still hold the group (a DDP reducer, a device mesh) go first.
    gc.collect()
    dist.destroy_process_group()
    torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))
    # The result is on disk. Leave without the interpreter's teardown: on gloo, the order in
    # which it destroys torch's remaining C++ objects (threads of a process group a DDP
    # reducer still referenced) sometimes aborts the process ("terminate called without an
    # active exception") after all the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(fn: Callable[[int, int], Any], world: int, tmp: Path, timeout: float = 240.0) -> list[Any]:
    """``fn(rank, world)`` on ``world`` processes; returns each rank's result, in rank order.

    ``fn`` must be a module-level function (it is pickled by name into the spawned processes)
    and return something ``torch.save`` can write; ``tmp`` is a new or empty folder for the
    store and the results. An exception on any rank is raised here with that rank's traceback; a
    run longer than ``timeout`` seconds is killed and raises ``TimeoutError``.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    ctx = start_processes(  # type: ignore[no-untyped-call]
        _worker, args=(world, str(tmp), fn), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            raise TimeoutError(f"{world} processes did not finish within {timeout} s")
    results = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for rank, result in enumerate(results):
        if isinstance(result, dict) and "error" in result:
            raise AssertionError(f"rank {rank} failed:\n{result['error']}")
    return results
