"""Can fewer Newton–Schulz steps match torch.optim.Muon's accuracy? (docs/performance.md)

Prints the relative Frobenius error ``||NS(G) - U V^T||_F / ||U V^T||_F`` of 5- and 4-step
schedules in bfloat16 on the width-384 nanoGPT shapes (qkv 1152 x 384, projection 384 x 384,
MLP 384 x 1536), for Gaussian matrices and for spectra ``sigma_i = i^-p``. The 4-step Polar
Express schedules for other lower bounds are rebuilt with
:func:`gluon_optim.polar.polar_express_schedule`, with the paper's 1.01 safety factor on every
step but the last. Run: ``python benchmarks/schedules.py`` (a few seconds on 2 cores).
"""

from __future__ import annotations

import torch

from gluon_optim.polar import (
    NewtonSchulzPreset,
    newton_schulz,
    polar_express_schedule,
    polar_svd,
    relative_error,
)

SHAPES = [(1152, 384), (384, 384), (384, 1536)]
SPECTRA = [0.0, 0.5, 1.0, 1.5]  # 0: Gaussian, else sigma_i = i^-p


def _matrix(shape: tuple[int, int], power: float, gen: torch.Generator) -> torch.Tensor:
    m, n = shape
    if power == 0.0:
        return torch.randn(m, n, generator=gen)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen))
    return (u * torch.arange(1, k + 1, dtype=torch.float32) ** -power) @ v.T


def _rebuilt(lower: float, steps: int) -> NewtonSchulzPreset:
    raw = polar_express_schedule(steps, lower)
    safe = tuple((a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in raw[:-1]) + (raw[-1],)
    return NewtonSchulzPreset(name=f"pe-lower{lower:g}", coefficients=safe, safety=1.01)


def main() -> None:
    gen = torch.Generator().manual_seed(1)
    cases = {(s, p): _matrix(s, p, gen) for p in SPECTRA for s in SHAPES}
    refs = {key: polar_svd(g.double()) for key, g in cases.items()}
    schedules: list[tuple[str, str | NewtonSchulzPreset, int]] = [
        ("Jordan, 5 steps (torch)", "jordan", 5),
        ("Polar Express, 5 steps", "polar_express", 5),
        ("Polar Express (lower bound 1e-3), 4 steps", "polar_express", 4),
        ("Polar Express rebuilt for lower bound 3e-3, 4 steps", _rebuilt(3e-3, 4), 4),
        ("same, lower bound 1e-2, 4 steps", _rebuilt(1e-2, 4), 4),
    ]
    heads = ["Gaussian" if p == 0.0 else f"1/i^{p:g}" for p in SPECTRA]
    print("| schedule (bf16, width 384 shapes) | " + " | ".join(heads) + " |")
    print("|---|" + "---:|" * len(SPECTRA))
    for name, preset, steps in schedules:
        cells = []
        for p in SPECTRA:
            errs = [
                relative_error(
                    newton_schulz(cases[(s, p)], preset=preset, steps=steps), refs[(s, p)]
                )
                for s in SHAPES
            ]
            lo, hi = min(errs), max(errs)
            cells.append(f"{lo:.3f}" if f"{lo:.3f}" == f"{hi:.3f}" else f"{lo:.3f}-{hi:.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
