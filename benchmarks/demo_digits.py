"""Compare AdamW, Muon and (unconstrained / constrained) Scion on scikit-learn's digits.

A small MLP (64 -> 256 -> 256 -> 10) is trained on the bundled 8x8 digits (1797 images, no
download) for a fixed number of epochs with every optimizer, from the same initialisation and
with the same minibatch order for a given seed. The script prints, per optimizer, the final test
cross-entropy and accuracy (mean ± std over seeds) and the wall-clock time of the training loop.
Every number is measured in this run on this machine; nothing is copied from elsewhere. On a
small shared VM torch's default thread count can make times swing several-fold between runs;
``--threads 1`` steadies them.

Settings were fixed by a grid search with this file's `run` (seeds 0-2, 15 epochs, batch 64),
picking the lowest mean final cross-entropy on a validation split of the training set (80/20,
stratified, random_state=1: 1077 train / 270 validation); the test set played no part in it.
Mean validation loss per setting (* = chosen; per-seed spread is about ±0.01-0.03):

    adamw   lr  1e-4 0.900  3e-4 0.203  1e-3 0.098  3e-3 0.098  5e-3 0.078  7e-3 0.056*
                1e-2 0.066  1.4e-2 0.095  2e-2 0.111  3e-2 0.130  5e-2 0.137
    muon    rows lr, columns adamw_lr (head and biases)
                    0      1e-5   3e-5   1e-4   3e-4   1e-3   3e-3
            0.005   -      -      -      -      0.206  0.081  0.053
            0.01    -      -      0.100  0.077  0.054  0.048  0.054
            0.02    0.045  0.044  0.046  0.047* 0.058  0.053  0.086
            0.03    -      -      -      0.069  0.084  0.184  -
            0.05    -      -      -      -      0.166  0.092  0.237
            0.1     -      -      -      -      0.326  0.354  0.343
            (at lr 0.02, adamw_lr <= 1e-4 is a plateau: a head frozen at init does as well;
            1e-4 is kept so that the head does train)
    scion   rows lr, columns head scale; hidden and bias scale 50 (radius t = lr * scale)
                    100    300    1000   3000   10000
            1e-4    -      0.402  0.148  0.079  0.066
            2e-4    0.104  0.076  0.052* 0.136  -
            5e-4    0.070  0.115  0.084  0.261  -
            1e-3    0.187  0.234  0.300  0.849  -
            2e-3    0.330  0.941  2.396  3.303  -
    scion-constrained, same columns
            2e-4    0.115  0.081  0.056  0.078
            5e-4    0.063  0.042* 0.131  0.236
            1e-3    0.086  0.162  0.462  0.561
            2e-3    0.170  0.434  0.566  2.413
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

import gluon_optim as go

Data = tuple[Tensor, Tensor, Tensor, Tensor]

#: Settings chosen by the grid search in the module docstring.
CONFIGS: dict[str, dict[str, Any]] = {
    "adamw": {"lr": 7e-3},
    "muon": {"lr": 0.02, "adamw_lr": 1e-4},
    "scion": {"lr": 2e-4, "scales": {"hidden": 50.0, "head": 1000.0, "bias": 50.0}},
    "scion-constrained": {"lr": 5e-4, "scales": {"hidden": 50.0, "head": 300.0, "bias": 50.0}},
}


class MLP(nn.Module):
    """Two hidden ReLU layers; ``head`` is the output layer gluon_optim looks for."""

    def __init__(self, width: int = 256) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, width)
        self.fc2 = nn.Linear(width, width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))
        return logits


def load_data() -> Data:
    """Stratified 75/25 train/test split of the digits, pixels scaled to [0, 1]."""
    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        digits.data / 16.0, digits.target, test_size=0.25, random_state=0, stratify=digits.target
    )
    xs = [torch.tensor(a, dtype=torch.float32) for a in (x_tr, x_te)]
    ys = [torch.tensor(a, dtype=torch.long) for a in (y_tr, y_te)]
    return xs[0], ys[0], xs[1], ys[1]


def make_optimizer(name: str, model: nn.Module, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    if name == "muon":
        return go.muon(model, lr=cfg["lr"], adamw_lr=cfg["adamw_lr"])
    if name in ("scion", "scion-constrained"):
        constrained = name == "scion-constrained"
        return go.scion(model, lr=cfg["lr"], constrained=constrained, scales=cfg["scales"])
    raise ValueError(f"unknown optimizer {name!r}; expected one of {sorted(CONFIGS)}")


def run(
    name: str,
    cfg: dict[str, Any],
    seed: int,
    epochs: int,
    data: Data,
    batch_size: int = 64,
    verbose: bool = False,
) -> dict[str, float]:
    """Train one model; returns the final loss and accuracy on data[2:] and the loop seconds."""
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(seed)  # same initial weights for every optimizer at this seed
    model = MLP()
    opt = make_optimizer(name, model, cfg)
    if verbose and isinstance(opt, go.Gluon):
        print(f"\n{name} (seed {seed}):\n{go.describe(opt)}\n")
    shuffle = torch.Generator().manual_seed(seed)  # same minibatch order for every optimizer
    n_batches = len(x_tr) // batch_size  # the last partial batch is dropped
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x_tr), generator=shuffle)
        for b in range(n_batches):
            idx = order[b * batch_size : (b + 1) * batch_size]
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        logits = model(x_te)
        test_loss = F.cross_entropy(logits, y_te).item()
        test_acc = (logits.argmax(dim=1) == y_te).float().mean().item()
    return {"loss": test_loss, "acc": test_acc, "seconds": seconds}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def describe_cfg(cfg: dict[str, Any]) -> str:
    parts = [f"{k}={v:g}" for k, v in cfg.items() if isinstance(v, float)]
    if "scales" in cfg:
        parts.append("scales=" + ",".join(f"{r}:{s:g}" for r, s in cfg["scales"].items()))
    return " ".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    parser.add_argument("--optimizers", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--verbose", action="store_true", help="print go.describe(opt) once")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    data = load_data()
    print(
        f"digits: {len(data[0])} train / {len(data[2])} test, {args.epochs} epochs, batch 64, "
        f"torch threads: {torch.get_num_threads()}"
    )
    results: dict[str, Any] = {}
    for name in args.optimizers:
        cfg = CONFIGS[name]
        runs = [
            run(name, cfg, seed, args.epochs, data, verbose=args.verbose and seed == 0)
            for seed in range(args.seeds)
        ]
        results[name] = {"config": cfg, "runs": runs}

    print("\n| optimizer | settings | test loss | test acc (%) | train time (s) |")
    print("|---|---|---|---|---|")
    for name, res in results.items():
        loss_m, loss_s = mean_std([r["loss"] for r in res["runs"]])
        acc_m, acc_s = mean_std([100.0 * r["acc"] for r in res["runs"]])
        time_m = statistics.fmean(r["seconds"] for r in res["runs"])
        print(
            f"| {name} | {describe_cfg(res['config'])} | {loss_m:.4f} ± {loss_s:.4f} "
            f"| {acc_m:.2f} ± {acc_s:.2f} | {time_m:.2f} |"
        )
    print(f"\nmean ± std over seeds 0..{args.seeds - 1}; times measured in this run")
    if args.json:
        meta = {
            "epochs": args.epochs,
            "seeds": args.seeds,
            "batch_size": 64,
            "threads": torch.get_num_threads(),
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
