"""Owner balance of the distributed step with whole parameters against per-unit owners.

Run with ``python benchmarks/owner_balance.py [--json out.json]`` (a second; nothing is
trained: the owner table is a function of shapes). Each LMO unit's cost is the owner plan's
own model (``lmo_cost``: Newton–Schulz multiply-adds), assigned by its longest-processing-time
rule (``assign_owners``), for two granularities:

* ``parameter``: one owner per parameter (today's executors);
* ``unit``: one owner per LMO unit, an expert of a stack or a block of ``blocks``.

For each shape set and world size it prints the imbalance ``max load / mean load`` (1 is
perfect; the step waits for the slowest owner), the busy ranks, and the bytes one rank sends
per step under ``distributed="replicated"`` with bf16 directions: ``(W - 1) * 2 * E_max``,
``E_max`` the largest rank's direction elements (every rank's all-gather buffer is padded to
it), the documented formula without its status and agreement terms.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from gluon_optim import norms
from gluon_optim.distributed.plan import assign_owners, lmo_cost

Shape = tuple[int, ...]
#: (name, stored shape of the units' view (*units, d_out, d_in), how many such parameters)
ShapeSet = list[tuple[str, Shape, int]]


def gpt2_124m(split_qkv: bool) -> ShapeSet:
    """GPT-2 small's 48 hidden matrices; ``split_qkv``: ``c_attn`` per head (36 of 64 x 768)."""
    qkv: Shape = (36, 64, 768) if split_qkv else (2304, 768)
    return [
        ("c_attn", qkv, 12),
        ("attn.c_proj", (768, 768), 12),
        ("c_fc", (3072, 768), 12),
        ("mlp.c_proj", (768, 3072), 12),
    ]


def moe_64(layers: int = 16, d: int = 2048, d_ff: int = 1024) -> ShapeSet:
    """A 64-expert model (Qwen3-MoE-like): per layer ``gate_up_proj`` ``(64, 2 d_ff, d)``,
    ``down_proj`` ``(64, d, d_ff)`` and four attention projections."""
    return [
        ("gate_up_proj", (64, 2 * d_ff, d), layers),
        ("down_proj", (64, d, d_ff), layers),
        ("q_proj", (d, d), layers),
        ("k_proj", (d // 4, d), layers),
        ("v_proj", (d // 4, d), layers),
        ("o_proj", (d, d), layers),
    ]


def _items(shapes: ShapeSet, per_unit: bool) -> list[tuple[int, int, Shape]]:
    """``(cost, direction elements, kind)`` of every owner item."""
    spectral = norms.get("spectral")
    out = []
    for _, shape, count in shapes:
        units = math.prod(shape[:-2])
        unit = tuple(shape[-2:])
        for _ in range(count):
            if per_unit:
                out += [(lmo_cost(spectral, unit, 5), math.prod(unit), unit)] * units
            else:
                out.append((lmo_cost(spectral, shape, 5), math.prod(shape), tuple(shape)))
    return out


def balance(shapes: ShapeSet, world: int, per_unit: bool) -> dict[str, Any]:
    items = _items(shapes, per_unit)
    owners = assign_owners([c for c, _, _ in items], world, [k for _, _, k in items])
    loads, elements = [0] * world, [0] * world
    for (cost, n, _), rank in zip(items, owners, strict=True):
        loads[rank] += cost
        elements[rank] += n
    mean = sum(loads) / world
    return {
        "items": len(items),
        "imbalance": max(loads) / mean,
        "busy_ranks": sum(1 for x in loads if x),
        "replicated_bytes_per_rank": (world - 1) * 2 * max(elements),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cases = [
        ("GPT-2 124M, c_attn whole", gpt2_124m(False), (8, 64)),
        ("GPT-2 124M, c_attn per head", gpt2_124m(True), (8, 64)),
        ("64 experts x 16 layers", moe_64(), (8, 64)),
    ]
    rows = []
    print(
        f"{'shape set':30s} {'W':>3s} {'owners':9s} {'items':>6s} {'imbalance':>9s} "
        f"{'busy':>4s} {'MB sent/rank':>12s}"
    )
    for name, shapes, worlds in cases:
        for world in worlds:
            for per_unit in (False, True):
                r = balance(shapes, world, per_unit)
                r.update(shapes=name, world=world, owners="unit" if per_unit else "parameter")
                rows.append(r)
                print(
                    f"{name:30s} {world:3d} {r['owners']:9s} {r['items']:6d} "
                    f"{r['imbalance']:9.2f} {r['busy_ranks']:4d} "
                    f"{r['replicated_bytes_per_rank'] / 1e6:12.1f}"
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
