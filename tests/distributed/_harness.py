"""Run a function on W gloo processes and collect what each returns; fail instead of hanging.

One spawn per world size runs many cases: starting W processes costs seconds each on a 2-core
machine. Every process pins ``torch.set_num_threads(1)`` (some CPU kernels, LayerNorm's
backward among them, round differently with another thread count), and every process group has
a timeout, so a collective that one rank never reaches fails the test instead of hanging CI.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT = timedelta(seconds=60)


def _worker(rank: int, world: int, tmp: str, fn: Callable[[int, int], Any]) -> None:
    torch.set_num_threads(1)
    os.environ["TORCH_COMPILE_DISABLE"] = "1"
    store = dist.FileStore(os.path.join(tmp, "store"), world)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT
    )
    try:
        result: Any = fn(rank, world)
    except BaseException:  # reported to the parent, which fails the test with it
        result = {"error": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))


def run(fn: Callable[[int, int], Any], world: int, tmp: Path, timeout: float = 240.0) -> list[Any]:
    """``fn(rank, world)`` on ``world`` processes; returns each rank's result, rank order.

    ``fn`` must be a module-level function (it is pickled by name into spawned processes).
    """
    ctx = mp.start_processes(
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
