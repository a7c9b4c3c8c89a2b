"""Evidence for the ``blocks`` defaults: whole against split fused matrices, and per expert.

Run with ``make blocks-evidence`` (about 25 minutes on 2 cores) or ``python
benchmarks/blocks_evidence.py --json out.json``. Everything runs in this process, on the lab's
byte-level text (Python's own sources), with the demo's recipe (300 steps, batch 16, WSD
schedule with a 30% decay, validation on 8 batches):

* ``gpt-tiny``: the fused ``qkv`` (``[q; k; v]``, ``(192, 64)``) whole, split per projection
  (``chunks=3``) and per head (``chunks=6``: 2 heads of q, k and v);
* ``gpt-wide`` (``--models gpt-wide``, not in the default set): ``gpt-tiny`` with 4 layers, 4
  heads and width 128, the same three splits (per head is ``chunks=12``);
* ``moe-tiny`` (4 gated experts, top-2): each expert's ``gate_up_proj`` whole (the default),
  split into gate and up (``experts+chunks=2``), and the stacks flattened into one matrix
  (``whole``: what a 3-D tensor got before ``blocks`` existed).

For ``muon`` and ``unscion``, each variant gets its own learning-rate sweep (0.5x, 1x, 2x the
tuned default, seed 0, extended by one more factor of 2 where the best is at an edge); the
best lr of each variant then runs seeds 0, 1 and 2. The table shows
the mean and standard deviation of the final validation loss over those seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from gluon_optim.lab import optimizers
from gluon_optim.lab.bench.timing import load_average, machine_meta
from gluon_optim.lab.train import RunConfig, train

#: Lab model of each name, with its config overrides.
MODELS: dict[str, tuple[str, dict[str, int]]] = {
    "gpt-tiny": ("gpt-tiny", {}),
    "gpt-wide": ("gpt-tiny", {"n_layer": 4, "n_head": 4, "n_embd": 128}),
    "moe-tiny": ("moe-tiny", {}),
}
VARIANTS: dict[str, dict[str, dict[str, str] | None]] = {
    "gpt-tiny": {
        "qkv whole": None,
        "qkv per projection": {"*.qkv.weight": "chunks=3"},
        "qkv per head": {"*.qkv.weight": "chunks=6"},
    },
    "gpt-wide": {
        "qkv whole": None,
        "qkv per projection": {"*.qkv.weight": "chunks=3"},
        "qkv per head": {"*.qkv.weight": "chunks=12"},
    },
    "moe-tiny": {
        "per expert (default)": None,
        "per expert, gate | up": {"*.gate_up_proj": "experts+chunks=2"},
        "flattened stacks": {"*.experts.*": "whole"},
    },
}
FACTORS = (0.5, 1.0, 2.0)
SEEDS = (0, 1, 2)


def _run(model: str, optimizer: str, lr: float, blocks: Any, seed: int, root: Path) -> float:
    preset, overrides = MODELS[model]
    config = RunConfig(
        model=preset,
        model_options=dict(overrides),
        data="stdlib",
        optimizer=optimizer,
        lr=lr,
        opt_options={} if blocks is None else {"blocks": blocks},
        steps=300,
        batch_size=16,
        eval_every=300,
        eval_batches=8,
        schedule="wsd",
        decay_frac=0.3,
        seed=seed,
    )
    out = root / f"{model}-{optimizer}-{lr:g}-{seed}-{abs(hash(json.dumps(blocks)))}"
    return train(config, out, progress=False).final_val_loss


def measure(models: list[str], names: list[str], root: Path) -> list[dict[str, Any]]:
    rows = []
    for model in models:
        for optimizer in names:
            tuned, _ = optimizers.resolve(optimizer, MODELS[model][0], None, {})
            for variant, blocks in VARIANTS[model].items():
                sweep = {
                    f * tuned: _run(model, optimizer, f * tuned, blocks, 0, root) for f in FACTORS
                }
                best = min(sweep, key=lambda lr: sweep[lr])
                # A best lr at the grid's edge: one more factor of 2 past it (once).
                if best in (min(sweep), max(sweep)):
                    lr = best * 2 if best == max(sweep) else best / 2
                    sweep[lr] = _run(model, optimizer, lr, blocks, 0, root)
                    best = min(sweep, key=lambda lr: sweep[lr])
                losses = [sweep[best]] + [
                    _run(model, optimizer, best, blocks, s, root) for s in SEEDS[1:]
                ]
                rows.append(
                    {
                        "model": model,
                        "optimizer": optimizer,
                        "variant": variant,
                        "blocks": blocks,
                        "sweep": {f"{lr:g}": loss for lr, loss in sweep.items()},
                        "best_lr": best,
                        "losses": losses,
                        "mean": statistics.mean(losses),
                        "std": statistics.stdev(losses),
                    }
                )
                r = rows[-1]
                print(
                    f"{model:9s} {optimizer:8s} {variant:24s} lr {best:<8g} "
                    f"{r['mean']:.4f} ± {r['std']:.4f}   sweep "
                    + " ".join(f"{k}:{v:.4f}" for k, v in r["sweep"].items()),
                    flush=True,
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt-tiny,moe-tiny")
    parser.add_argument("--optimizers", default="muon,unscion")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    meta = machine_meta(None)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args.models.split(","), args.optimizers.split(","), Path(tmp))
    meta["loadavg_end"] = load_average()
    meta["wall_s"] = round(time.perf_counter() - start, 1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
