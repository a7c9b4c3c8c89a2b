"""Gluon reduces to known methods in degenerate settings; radius policies follow its theorems."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gluon_optim as go


def _param(*shape: int, seed: int = 0) -> nn.Parameter:
    return nn.Parameter(
        torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )


def _set_grad(p: nn.Parameter, k: int) -> torch.Tensor:
    g = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + k), dtype=p.dtype)
    p.grad = g
    return g


def test_sign_unscaled_without_momentum_is_sign_sgd() -> None:
    p = _param(5, 7)
    ref = p.detach().clone()
    opt = go.Gluon([p], lr=0.1, norm="sign_unscaled", momentum=0.0)
    for k in range(5):
        g = _set_grad(p, k)
        opt.step()
        ref -= 0.1 * torch.sign(g)
    torch.testing.assert_close(p.detach(), ref, rtol=0, atol=1e-15)


def test_euclidean_without_momentum_is_normalized_gd() -> None:
    p = _param(4, 3, 2)
    ref = p.detach().clone()
    opt = go.Gluon([p], lr=0.05, scale=2.0, norm="euclidean", momentum=0.0)
    for k in range(5):
        g = _set_grad(p, k)
        opt.step()
        ref -= 0.1 * g / g.norm()
    torch.testing.assert_close(p.detach(), ref, rtol=0, atol=1e-14)


def test_gluon_all_spectral_equals_muon_preset() -> None:
    a, b = _param(9, 4, seed=1).float(), _param(6, 6, seed=2).float()
    pa, pb = nn.Parameter(a.clone()), nn.Parameter(b.clone())
    qa, qb = nn.Parameter(a.clone()), nn.Parameter(b.clone())
    muon = go.muon([pa, pb], lr=0.03)
    gluon = go.Gluon(
        [qa, qb], lr=0.03, norm="spectral", shape_rule="muon", momentum=0.95, nesterov=True
    )
    for k in range(6):
        for x, y in ((pa, qa), (pb, qb)):
            g = _set_grad(x, k).float()
            x.grad, y.grad = g, g.clone()
        muon.step()
        gluon.step()
    assert torch.equal(pa, qa) and torch.equal(pb, qb)


def test_constrained_step_and_weight_decay() -> None:
    p = _param(6, 3)
    x0 = p.detach().clone()
    opt = go.Gluon(
        [p], lr=0.1, scale=3.0, norm="euclidean", momentum=0.0, constrained=True, weight_decay=0.5
    )
    g = _set_grad(p, 0)
    opt.step()
    expected = (1 - 0.1 * 0.5) * (1 - 0.1) * x0 - 0.1 * 3.0 * g / g.norm()
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-15)


def test_momentum_is_an_ema_and_nesterov_matches_closed_form() -> None:
    for nesterov in (False, True):
        p = _param(8)
        x = p.detach().clone()
        m = torch.zeros_like(x)
        opt = go.Gluon([p], lr=0.01, norm="euclidean", momentum=0.8, nesterov=nesterov)
        for k in range(4):
            g = _set_grad(p, k)
            opt.step()
            m = 0.8 * m + 0.2 * g
            d = g + 0.8 * (m - g) if nesterov else m
            x -= 0.01 * d / d.norm()
        torch.testing.assert_close(p.detach(), x, rtol=0, atol=1e-14)


def test_theory_decay_schedule() -> None:
    # Gluon Theorem 2: beta^k = 1 - (k+1)^(-1/2), t^k = lr * scale * (k+1)^(-3/4).
    p = _param(10)
    x = p.detach().clone()
    m = torch.zeros_like(x)
    opt = go.Gluon([p], lr=0.2, scale=0.5, norm="euclidean", radius_policy="theory_decay")
    for k in range(6):
        g = _set_grad(p, k)
        opt.step()
        beta = 1 - (k + 1) ** -0.5
        m = beta * m + (1 - beta) * g
        x -= 0.2 * 0.5 * (k + 1) ** -0.75 * m / m.norm()
    torch.testing.assert_close(p.detach(), x, rtol=0, atol=1e-14)


@pytest.mark.parametrize("source", ["gradient", "momentum"])
def test_l0l1_radius(source: str) -> None:
    # Gluon Theorem 1: t = ||G||_* / (L0 + L1 ||G||_*), here with the spectral norm (exact SVD).
    p = _param(7, 5)
    x = p.detach().clone()
    m = torch.zeros_like(x)
    opt = go.Gluon(
        [p],
        lr=1.0,
        norm="spectral",
        polar_method="svd",
        compute_dtype="float64",
        momentum=0.5,
        radius_policy="l0l1",
        l0=0.3,
        l1=2.0,
        radius_source=source,
    )
    c = math.sqrt(7 / 5)
    for k in range(4):
        g = _set_grad(p, k)
        opt.step()
        m = 0.5 * m + 0.5 * g
        src = g if source == "gradient" else m
        dual = c * torch.linalg.matrix_norm(src, "nuc")
        t = dual / (0.3 + 2.0 * dual)
        u, _, vh = torch.linalg.svd(m, full_matrices=False)
        x -= t * c * u @ vh
    torch.testing.assert_close(p.detach(), x, rtol=1e-12, atol=1e-12)


def test_l0l1_with_l0_zero_is_constant_one_over_l1() -> None:
    p = _param(6)
    x0 = p.detach().clone()
    opt = go.Gluon(
        [p], lr=1.0, norm="euclidean", momentum=0.0, radius_policy="l0l1", l0=0.0, l1=8.0
    )
    _set_grad(p, 0)
    opt.step()
    assert (p.detach() - x0).norm().item() == pytest.approx(1 / 8.0, rel=1e-12)


def test_conv_shape_rule_uses_flattened_shape() -> None:
    # Keller Jordan's Muon scales a conv update by sqrt(max(1, kh/kw)) read from the kernel dims;
    # The shape rules read the flattened (C_out, C_in*k*k) shape instead.
    p = _param(16, 2, 3, 3)  # flattened 16 x 18: sqrt(max(1, 16/18)) = 1
    q = _param(32, 2, 2, 2)  # flattened 32 x 8: sqrt(max(1, 4)) = 2
    for param, factor in ((p, 1.0), (q, 2.0)):
        x0 = param.detach().clone()
        opt = go.Gluon(
            [param],
            lr=0.1,
            norm="spectral",
            shape_rule="muon",
            momentum=0.0,
            polar_method="svd",
            compute_dtype="float64",
        )
        _set_grad(param, 0)
        opt.step()
        rank = min(param.shape[0], math.prod(param.shape[1:]))
        step = (param.detach() - x0).norm().item()
        assert step == pytest.approx(0.1 * factor * math.sqrt(rank), rel=1e-10)


@pytest.mark.parametrize("norm", ["auto", *sorted(go.norms.NORMS)])
def test_zero_gradient_gives_zero_step_in_the_optimizer(norm: str) -> None:
    shape = {"bias_rms": (5,), "spectral_conv": (4, 3, 3, 3)}.get(norm, (6, 4))
    p = nn.Parameter(torch.randn(*shape))
    x0 = p.detach().clone()
    for l0 in (1.0, 0.0):  # l0 = 0: the theorem's radius is 0/0 at a zero gradient
        opt = go.Gluon([p], lr=0.1, norm=norm, radius_policy="l0l1", l0=l0, l1=1.0)
        p.grad = torch.zeros_like(p)
        opt.step()
        assert torch.equal(p.detach(), x0)


def test_mvr1_with_the_approximate_two_point_gradient_is_steps_without_momentum() -> None:
    # Why a group refuses estimator='mvr1', two_point='approx': M^0 = g^0 and g_prev = g_{k-1}
    # telescope M <- g + beta (M - g_prev) to M = g. allow_degenerate=True builds it anyway.
    p, q = _param(6, 4), _param(6, 4)
    q.data.copy_(p.data)
    mvr = go.Gluon(
        [p],
        lr=0.1,
        norm="euclidean",
        estimator="mvr1",
        momentum=0.9,
        two_point="approx",
        allow_degenerate=True,
    )
    plain = go.Gluon([q], lr=0.1, norm="euclidean", momentum=0.0)
    for k in range(5):
        g = _set_grad(p, k)
        q.grad = g.clone()
        mvr.step()
        plain.step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-12)
