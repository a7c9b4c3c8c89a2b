"""Accuracy report: Newton–Schulz against the SVD polar factor, and parity against peers.

Run with ``make accuracy`` (or ``python benchmarks/accuracy.py --json out.json``). Everything is
measured in this run, on this machine's CPU:

1. Orthogonalisation error ``||NS(G) - U V^T||_F / ||U V^T||_F`` for every Newton–Schulz preset,
   step count and compute dtype, on Gaussian matrices and on matrices with a decaying spectrum
   (``sigma_i ~ i^-1.5``, closer to real gradients), with the range of the output's singular
   values.
2. The ``muon`` preset against ``torch.optim.Muon`` over 10 steps (max |difference|).
3. Gluon with Scion's norms against pytorch-optimizer's ``SCION`` over 10 steps on the same
   gradients (relative difference of the iterates).
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from torch import nn

import gluon_optim as go
from gluon_optim.polar import newton_schulz, polar_svd, relative_error

SHAPES = [(256, 256), (256, 1024), (1024, 256), (768, 768)]


def _decaying(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    m, n = shape
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -1.5
    return (u * s) @ v.T


def newton_schulz_table() -> list[dict[str, object]]:
    gen = torch.Generator().manual_seed(0)
    rows: list[dict[str, object]] = []
    configs = [
        ("jordan", 5, torch.bfloat16),
        ("jordan", 5, torch.float32),
        ("polar_express", 5, torch.bfloat16),
        ("polar_express", 5, torch.float32),
        ("polar_express", 8, torch.bfloat16),
        ("polar_express", 8, torch.float32),
        ("cubic", 5, torch.float32),
        ("cubic", 12, torch.float32),
    ]
    for kind in ("gaussian", "decaying"):
        mats = [
            torch.randn(*s, generator=gen, dtype=torch.float64)
            if kind == "gaussian"
            else _decaying(s, gen)
            for s in SHAPES
        ]
        refs = [polar_svd(g) for g in mats]
        for preset, steps, dtype in configs:
            errs, lo, hi = [], math.inf, 0.0
            for g, ref in zip(mats, refs, strict=True):
                out = newton_schulz(g.float(), preset=preset, steps=steps, dtype=dtype)
                errs.append(relative_error(out, ref))
                s = torch.linalg.svdvals(out.double())
                lo, hi = min(lo, s.min().item()), max(hi, s.max().item())
            rows.append(
                dict(
                    matrices=kind,
                    preset=preset,
                    steps=steps,
                    dtype=str(dtype).removeprefix("torch."),
                    mean_error=sum(errs) / len(errs),
                    max_error=max(errs),
                    sigma_min=lo,
                    sigma_max=hi,
                )
            )
    return rows


def _grads(params: list[nn.Parameter], step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen) * (1 + p.detach().abs()) for p in params]


def muon_parity() -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for nesterov in (True, False):
        for wd in (0.0, 0.1):
            gen = torch.Generator().manual_seed(0)
            init = [torch.randn(*s, generator=gen) * 0.05 for s in SHAPES]
            ours = [nn.Parameter(x.clone()) for x in init]
            ref = [nn.Parameter(x.clone()) for x in init]
            opt = go.muon(ours, lr=0.02, nesterov=nesterov, weight_decay=wd)
            peer = torch.optim.Muon(
                ref, lr=0.02, nesterov=nesterov, weight_decay=wd, adjust_lr_fn="original"
            )
            for step in range(10):
                for p, q, g in zip(ours, ref, _grads(ours, step), strict=True):
                    p.grad, q.grad = g, g.clone()
                opt.step()
                peer.step()
            diff = max((p - q).abs().max().item() for p, q in zip(ours, ref, strict=True))
            rows.append(dict(nesterov=nesterov, weight_decay=wd, steps=10, max_abs_diff=diff))
    return rows


def scion_peer_parity() -> list[dict[str, object]]:
    from pytorch_optimizer import SCION
    from pytorch_optimizer.optimizer.scion import LMONorm

    gen = torch.Generator().manual_seed(0)
    specs = {
        "spectral": ((512, 256), LMONorm.SPECTRAL, 50.0),
        "sign": ((64, 512), LMONorm.SIGN, 3000.0),
        "bias_rms": ((512,), LMONorm.BIAS, 50.0),
    }
    init = {k: torch.randn(*s, generator=gen) * 0.05 for k, (s, _, _) in specs.items()}
    ours = {k: nn.Parameter(v.clone()) for k, v in init.items()}
    theirs = {k: nn.Parameter(v.clone()) for k, v in init.items()}
    opt = go.Gluon(
        [{"params": [ours[k]], "norm": k, "scale": sc} for k, (_, _, sc) in specs.items()],
        lr=0.00036,
        momentum=0.9,
    )
    peer = SCION(
        [{"params": [theirs[k]], "norm_type": t, "scale": sc} for k, (_, t, sc) in specs.items()],
        lr=0.00036,
        momentum=0.1,
        foreach=False,
    )
    for step in range(10):
        grads = _grads(list(ours.values()), step)
        for (k, p), g in zip(ours.items(), grads, strict=True):
            p.grad, theirs[k].grad = g, g.clone()
        opt.step()
        peer.step()
    return [
        dict(
            norm=k,
            steps=10,
            relative_diff=((ours[k] - theirs[k]).norm() / (ours[k] - init[k]).norm()).item(),
        )
        for k in specs
    ]


def _print_rows(title: str, rows: list[dict[str, object]]) -> None:
    print(f"\n## {title}\n")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        cells = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the tables to this JSON file")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {
        "newton_schulz": newton_schulz_table(),
        "muon_vs_torch_muon": muon_parity(),
        "scion_vs_pytorch_optimizer": scion_peer_parity(),
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    _print_rows(
        "Newton–Schulz vs SVD polar factor (shapes: " + str(SHAPES) + ")", results["newton_schulz"]
    )
    _print_rows("muon preset vs torch.optim.Muon", results["muon_vs_torch_muon"])
    _print_rows(
        "Gluon (Scion norms) vs pytorch-optimizer SCION", results["scion_vs_pytorch_optimizer"]
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
