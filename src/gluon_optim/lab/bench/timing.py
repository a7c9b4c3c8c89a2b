"""What every benchmark records next to its times: the machine, its load, robust summaries."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Sequence
from typing import Any

import torch


def quartiles(times: Sequence[float]) -> tuple[float, float]:
    """First and third quartile (inclusive method); a single time is both."""
    if len(times) < 2:
        return times[0], times[0]
    q = statistics.quantiles(times, n=4, method="inclusive")
    return q[0], q[2]


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, recorded so a noisy run can be told apart."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - platform without getloadavg
        return None


def machine_meta(threads: int | None, **extra: Any) -> dict[str, Any]:
    """The ``meta`` block of a result: versions, CPU, threads, load at the start, ``extra``."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads() if threads is None else threads,
        "loadavg_start": load_average(),
        **extra,
    }


def fmt(value: float | None, spec: str) -> str:
    """``format(value, spec)``, or ``-`` for a quantity that was not measured."""
    return "-" if value is None else format(value, spec)


def conditions(meta: dict[str, Any], timed: int) -> str:
    """How a table's times were taken, from its ``meta``: precision, versions, counts, load."""
    return (
        f"fp32 CPU, torch {meta['torch']}, threads {meta['threads']}, median of {timed} after "
        f"{meta['warmup']} warm-up steps; load average {meta.get('loadavg_start')} -> "
        f"{meta.get('loadavg_end')}"
    )
