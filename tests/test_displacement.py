"""The controlled-displacement smoothness estimate, bootstrap intervals and the 1/t check."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

import gluon_optim as go
from gluon_optim.smoothness import (
    DisplacementProbe,
    bootstrap_fit,
    fit_l0_l1,
    radius_dependence,
)


def _quadratic() -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.Linear(6, 4, bias=False).double()
    x = torch.randn(6, 16, dtype=torch.float64)
    y = torch.randn(4, 16, dtype=torch.float64)
    return layer, x, y


def test_on_a_quadratic_the_ratio_is_the_exact_curvature_at_every_scale() -> None:
    """f(W) = 0.5 ||W X - Y||^2 has grad (W X - Y) X^T, so a displacement D changes it by
    D X X^T exactly: L_hat(s) = ||d X X^T||_* / ||d|| for every s, the oracle below."""
    layer, x, y = _quadratic()
    opt = go.Gluon([("w", layer.weight)], lr=0.01, scale=1.0, compute_dtype="float64")

    def loss() -> torch.Tensor:
        return 0.5 * (layer.weight @ x - y).square().sum()

    probe = DisplacementProbe(opt, loss, scales=(0.01, 0.1, 1.0, 10.0), every=0)
    records = probe.measure(step=7)
    assert [r["scale"] for r in records] == [0.01, 0.1, 1.0, 10.0]
    norm = go.resolve_norm(opt.param_groups[0], layer.weight)
    w = layer.weight.detach()
    g = (w @ x - y) @ x.T
    d = norm.lmo(g)
    d = d / norm.norm_of(d)
    oracle = (norm.dual_of(d @ x @ x.T) / norm.norm_of(d)).item()
    for r in records:
        assert r["L_hat"] == pytest.approx(oracle, rel=1e-9)
        assert r["displacement"] == pytest.approx(r["scale"] * 0.01, rel=1e-9)
        assert r["grad_dual"] == pytest.approx(norm.dual_of(g).item(), rel=1e-9)
    check = radius_dependence({r["scale"]: r["L_hat"] for r in records})
    assert check["flag"] == "flat" and abs(check["slope"]) < 1e-6


def test_a_fresh_batch_per_call_shows_up_as_one_over_s() -> None:
    """What the trajectory estimate suffers from: two different batches. The ratio then scales
    like 1/s, and radius_dependence says so."""
    layer, _, _ = _quadratic()
    opt = go.Gluon([("w", layer.weight)], lr=0.01, compute_dtype="float64")
    gen = torch.Generator().manual_seed(1)

    def noisy_loss() -> torch.Tensor:
        x = torch.randn(6, 16, generator=gen, dtype=torch.float64)
        y = torch.randn(4, 16, generator=gen, dtype=torch.float64)
        return 0.5 * (layer.weight @ x - y).square().sum()

    records = DisplacementProbe(opt, noisy_loss, scales=(0.01, 0.1, 1.0), every=0).measure()
    check = radius_dependence({r["scale"]: r["L_hat"] for r in records})
    assert check["flag"] == "1/t" and check["slope"] < -0.9


def test_the_probe_never_changes_the_run() -> None:
    def run(probed: bool) -> tuple[list[torch.Tensor], int]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
        opt = go.scion(model, head=model[2], constrained=False)
        x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))

        def loss() -> torch.Tensor:
            return nn.functional.cross_entropy(model(x), y)

        probe = DisplacementProbe(opt, loss, every=2) if probed else None
        for _ in range(5):
            opt.zero_grad()
            loss().backward()
            grads = [p.grad for p in model.parameters()]
            opt.step()
            assert all(p.grad is g for p, g in zip(model.parameters(), grads, strict=True))
        count = len(probe.records) if probe else 0
        return [p.detach().clone() for p in model.parameters()], count

    probed, count = run(True)
    plain, _ = run(False)
    assert all(torch.equal(a, b) for a, b in zip(probed, plain, strict=True))
    assert count == 2 * 4 * 4  # steps 2 and 4; 4 LMO parameters; 4 scales


def test_random_directions_and_bad_arguments(tmp_path: object) -> None:
    layer, x, y = _quadratic()
    opt = go.Gluon([("w", layer.weight)], lr=0.01, compute_dtype="float64")

    def loss() -> torch.Tensor:
        return 0.5 * (layer.weight @ x - y).square().sum()

    records = DisplacementProbe(opt, loss, scales=(0.5, 2.0), every=0, direction="random").measure()
    assert records[0]["L_hat"] == pytest.approx(records[1]["L_hat"], rel=1e-9)
    with pytest.raises(ValueError, match="scales must be finite numbers > 0"):
        DisplacementProbe(opt, loss, scales=(0.1, -1.0))
    with pytest.raises(ValueError, match="direction must be 'lmo' or 'random'"):
        DisplacementProbe(opt, loss, direction="up")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="needs a gluon_optim.Gluon"):
        DisplacementProbe(torch.optim.SGD(layer.parameters(), lr=0.1), loss)  # type: ignore[arg-type]


def test_bootstrap_intervals_cover_the_truth_and_say_when_there_is_too_little() -> None:
    rng = random.Random(0)
    xs = [rng.uniform(0.5, 5.0) for _ in range(200)]
    ys = [2.0 + 3.0 * x + rng.gauss(0.0, 0.3) for x in xs]
    out = bootstrap_fit((ys, xs), penalty=0.0, samples=200, level=0.99)
    assert out["samples"] == 200
    assert out["l0"][0] < 2.0 < out["l0"][1] and out["l1"][0] < 3.0 < out["l1"][1]
    point = fit_l0_l1((ys, xs), penalty=0.0)
    assert out["l1"][0] < point.l1 < out["l1"][1]
    assert bootstrap_fit(([1.0, 2.0], [1.0, 2.0]))["l1"] is None
    with pytest.raises(ValueError, match="samples must be an int >= 1"):
        bootstrap_fit((ys, xs), samples=0)
    with pytest.raises(ValueError, match=r"level must be a float in \(0, 1\)"):
        bootstrap_fit((ys, xs), level=1.5)


def test_radius_dependence_reads_the_slope() -> None:
    assert radius_dependence({0.01: 120.0, 0.02: 60.0, 0.04: 30.0})["flag"] == "1/t"
    assert radius_dependence({0.01: 120.0, 0.02: 60.0, 0.04: 30.0})["l1_t"] == {
        0.01: pytest.approx(1.2),
        0.02: pytest.approx(1.2),
        0.04: pytest.approx(1.2),
    }
    assert radius_dependence({0.01: 50.0, 0.1: 52.0})["flag"] == "flat"
    assert radius_dependence({0.01: 50.0, 0.1: 15.0})["flag"] == "between"
    assert radius_dependence({0.01: 50.0, 0.1: None})["flag"] is None


def test_each_expert_of_a_stack_moves_by_s_in_its_own_norm() -> None:
    """A stack of 3 experts ``W[e]`` with ``f = 0.5 sum_e ||W[e] X_e - Y_e||^2``: each expert is
    a layer, displaced by ``s`` in its own norm, with the quadratic's exact ratio per expert."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3, 4, 6, dtype=torch.float64))
    x = torch.randn(3, 6, 16, dtype=torch.float64)
    y = torch.randn(3, 4, 16, dtype=torch.float64)
    opt = go.Gluon(
        [{"params": [("w", w)], "blocks": "experts", "lr": 0.01, "compute_dtype": "float64"}]
    )

    def loss() -> torch.Tensor:
        return 0.5 * (w @ x - y).square().sum()

    records = DisplacementProbe(opt, loss, scales=(0.1, 1.0), every=0).measure()
    assert [r["param"] for r in records] == ["w[0]", "w[1]", "w[2]"] * 2
    norm = go.resolve_norm(opt.param_groups[0], w)
    for r in records:
        e = int(r["param"][2])
        g = (w[e] @ x[e] - y[e]) @ x[e].T
        d = norm.lmo(g.detach())
        d = d / norm.norm(d)
        oracle = (norm.dual(d @ x[e] @ x[e].T) / norm.norm(d)).item()
        assert r["L_hat"] == pytest.approx(oracle, rel=1e-9)
        assert r["displacement"] == pytest.approx(r["scale"] * 0.01, rel=1e-9)
