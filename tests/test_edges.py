"""Numerics at the edges: tiny and huge gradients in every dtype give bounded, finite steps."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import gluon_optim as go

SCALES = [1e-38, 1e-30, 1e-23, 1e-10, 1.0, 1e10, 1e30]
ELEMENTWISE = ["colnorm", "rownorm", "bias_rms", "euclidean", "sign", "sign_unscaled"]


def _gradients(shape: tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(*shape, generator=gen, dtype=torch.float64)
    out = [(base * s).to(dtype) for s in SCALES]
    return [g for g in out if torch.isfinite(g).all() and bool(g.ne(0).any())]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_lmos_are_unit_size_at_every_scale(name: str, dtype: torch.dtype) -> None:
    # The squares of entries below 1e-19 (float32) underflow and those above 1e19 overflow;
    # the direction must still be on the unit sphere of its norm, up to the dtype's rounding.
    norm = go.norms.get(name)
    tol = 4 * torch.finfo(dtype).eps
    for g in _gradients((6, 4), dtype):
        d = norm.lmo(g)
        assert torch.isfinite(d).all(), (name, dtype, g.abs().max())
        size = norm.norm(d.double()).amax().item()
        assert abs(size - 1.0) <= tol, (name, dtype, g.abs().max().item(), size)


@pytest.mark.parametrize(
    ("compute", "method"),
    list(itertools.product(["bfloat16", "float16", "float32", "float64"], ["newton_schulz"]))
    + [("float64", "svd")],
)
@pytest.mark.parametrize("name", ["spectral", "spectral_conv"])
def test_spectral_lmos_are_finite_and_bounded_at_every_scale(
    name: str, compute: str, method: str
) -> None:
    # Jordan's quintic overshoots to singular values of about 1.2 by design; the SVD is exact.
    # A tiny gradient gives a tiny step (the Frobenius floor eps, as torch.optim.Muon).
    norm = go.norms.get(name, compute_dtype=compute, method=method)
    shape = (6, 4, 3, 3) if name == "spectral_conv" else (6, 4)
    for dtype in (torch.float32, torch.bfloat16):
        # The LMO is returned in the gradient's dtype, which rounds the exact SVD's output.
        bound = 1.0 + 4 * torch.finfo(dtype).eps if method == "svd" else 1.3
        for g in _gradients(shape, dtype):
            d = norm.lmo(g)
            assert torch.isfinite(d).all(), (name, compute, g.abs().max().item())
            assert norm.norm(d.double()).amax().item() <= bound


def test_float16_newton_schulz_normalises_before_the_cast() -> None:
    # Entries above 65504 used to become inf in the cast, and the parameters NaN.
    p = nn.Parameter(torch.zeros(8, 4))
    opt = go.Gluon([p], lr=0.1, norm="spectral", compute_dtype="float16")
    p.grad = torch.randn(8, 4) * 1e6
    opt.step()
    assert torch.isfinite(p).all() and p.abs().max() > 0


def test_a_rare_tokens_embedding_row_never_explodes() -> None:
    # Scion's embedding norm (colnorm of the transposed weight, each token's row normalised)
    # with momentum 0.9: token 3 is seen once, at step 0, so its momentum row decays as 0.9^k
    # and its squares underflow near step 440. Its direction must stay unit size (a step of
    # exactly the radius), never the 1e15 a clamped zero norm gave.
    vocab, dim, lr, scale = 10, 4, 0.01, 50.0
    w = nn.Parameter(torch.randn(vocab, dim) * 0.1)
    opt = go.Gluon([w], lr=lr, norm="colnorm", transposed=True, scale=scale, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    radius = lr * scale * dim**0.5  # t * f, f = sqrt(d_out) with d_out = dim
    biggest = 0.0
    for k in range(700):
        g = torch.randn(vocab, dim, generator=gen)
        if k > 0:
            g[3] = 0.0  # token 3 only at step 0
        w.grad = g
        before = w[3].detach().clone()
        opt.step()
        biggest = max(biggest, (w[3] - before).norm().item())
    assert biggest <= radius * (1 + 1e-5)
    assert w.abs().max() < 1e3


# -- checks before anything changes -------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1])
def test_a_tensor_lr_gets_the_checks_a_float_lr_gets(bad: float) -> None:
    p = nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match="Tensor lr .* must be finite and >= 0"):
        go.Gluon([p], lr=torch.tensor(bad))
    opt = go.Gluon([p], lr=torch.tensor(0.1))
    opt.param_groups[0]["lr"] = torch.tensor(bad)
    p.grad = torch.randn(4, 3)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="Tensor lr"):
        opt.step()
    assert torch.equal(p, before) and not opt.state


def test_a_one_element_lr_of_any_shape_acts_as_a_scalar() -> None:
    # PyTorch's test_tensor_lr_num_dim_2: an lr of shape (1, 1) on a vector parameter.
    results = []
    for lr in (torch.tensor(0.1), torch.tensor([[0.1]]), 0.1):
        b = nn.Parameter(torch.ones(5))
        opt = go.Gluon([b], lr=lr, norm="bias_rms", weight_decay=0.1)
        b.grad = torch.arange(5.0)
        opt.step()
        results.append(b.detach().clone())
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_a_parameter_listed_twice_in_one_group_says_so() -> None:
    p = nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"'params\[1\]' is listed twice in one param group"):
        go.Gluon([p, p])


def _stepped() -> tuple[nn.Parameter, go.Gluon]:
    p = nn.Parameter(torch.randn(4, 3))
    opt = go.Gluon([p], lr=0.1, estimator="mvr1", two_point="approx", allow_degenerate=True)
    for _ in range(2):
        p.grad = torch.randn(4, 3)
        opt.step()
    return p, opt


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.update(momentun=s.pop("momentum_buffer")), "state key 'momentun' is not kept"),
        (
            lambda s: s.update(momentum_buffer=torch.zeros(3, 4)),
            r"shape \(3, 4\), expected \(4, 3\)",
        ),
        (lambda s: s.update(momentum_buffer=torch.full((4, 3), float("nan"))), "non-finite"),
        (lambda s: s.update(momentum_buffer=torch.zeros(4, 3, dtype=torch.int64)), "floating"),
        (lambda s: s.update(step=torch.tensor(-1.0)), "whole number >= 0"),
        (lambda s: s.update(step=torch.tensor(1.5)), "whole number >= 0"),
        (lambda s: s.update(step="two"), "step must be a count"),
        (lambda s: s.update(prev_param=s["prev_grad"]), "state key 'prev_param' is not kept"),
    ],
)
def test_load_state_dict_checks_the_state_and_changes_nothing(mutate: object, message: str) -> None:
    p, opt = _stepped()
    saved = opt.state_dict()
    bad = {"state": {0: dict(saved["state"][0])}, "param_groups": saved["param_groups"]}
    mutate(bad["state"][0])  # type: ignore[operator]
    before = {k: v.clone() for k, v in opt.state[p].items()}
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(bad)
    assert all(torch.equal(opt.state[p][k], v) for k, v in before.items())


def test_a_plain_number_step_loads_and_steps() -> None:
    # PyTorch's test_load_nontensor_step: the step counter saved as a number.
    p, opt = _stepped()
    saved = opt.state_dict()
    saved["state"][0]["step"] = 2
    opt.load_state_dict(saved)
    p.grad = torch.randn(4, 3)
    opt.step()
    assert float(opt.state[p]["step"]) == 3.0


def test_no_silent_fallback_to_radius_one() -> None:
    # An empty probe's fits used to give settings={} and every layer at lr * scale = 1.
    with pytest.raises(ValueError, match="no fit has constants"):
        go.smoothness.radius_settings({})
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    opt = go.gluon(model, lr=1.0, head=model[1], radius_policy="l0l1", l1=40.0)
    assert "l0l1(1)" in go.describe(opt)  # not "1", as if the radius were constant


def test_a_step_that_would_overflow_is_refused_before_anything_moves() -> None:
    a, b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5))
    with pytest.raises(ValueError, match="overflows float32"):
        go.Gluon([a, b], lr=1e300)
    opt = go.Gluon([a, b], lr=0.1)
    opt.param_groups[0]["scale"] = 1e305
    a.grad, b.grad = torch.randn(4, 3), torch.randn(5)
    before = [a.detach().clone(), b.detach().clone()]
    with pytest.raises(ValueError, match="overflows float32"):
        opt.step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])


def test_a_gradient_too_large_for_newton_schulz_is_not_a_silent_zero_step() -> None:
    # Entries above about 1e19 overflow the Frobenius norm inside Newton-Schulz, which then
    # returns zeros. Such a gradient is treated as non-finite: raise, or skip the group.
    p = nn.Parameter(torch.randn(6, 4))
    opt = go.Gluon([("w", p)], lr=0.1, norm="spectral")
    p.grad = torch.randn(6, 4) * 1e30
    before = p.detach().clone()
    with pytest.raises(FloatingPointError, match=r"\['w'\].*entry above 1e18"):
        opt.step()
    assert torch.equal(p, before)
    opt.param_groups[0]["nonfinite"] = "skip"
    opt.step()
    assert torch.equal(p, before)
