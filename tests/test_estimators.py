"""Variance-reduced estimators (Gluon-MVR-1/2/3, STORM) and the two-point gradient."""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import gluon_optim as go
from conftest import TinyNet, closure_losses, lm_loss

F64 = torch.float64
SHAPE = (5, 3)


class LeastSquares:
    """Batches ``(x_k, y_k)``, ``f_k(W) = mean((x_k W^T - y_k)^2) / 2``: gradients depend on W."""

    def __init__(self, seed: int = 0, steps: int = 8, zero_first: bool = False) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.w0 = torch.randn(*SHAPE, generator=gen, dtype=F64)
        self.batches = [
            (
                torch.randn(7, SHAPE[1], generator=gen, dtype=F64),
                torch.randn(7, SHAPE[0], generator=gen, dtype=F64),
            )
            for _ in range(steps)
        ]
        if zero_first:  # a batch the starting point fits exactly: g_0(X^0) = 0
            x0 = self.batches[0][0]
            self.batches[0] = (x0, x0 @ self.w0.T)

    def loss(self, w: torch.Tensor, k: int) -> torch.Tensor:
        x, y = self.batches[k]
        return 0.5 * ((x @ w.T - y) ** 2).mean()

    def grad(self, w: torch.Tensor, k: int) -> torch.Tensor:
        w = w.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(self.loss(w, k), w)
        return g


def _lmo(norm: str, m: torch.Tensor) -> torch.Tensor:
    if norm == "euclidean":
        return -m / m.norm()
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return -math.sqrt(m.shape[0] / m.shape[1]) * u @ vh  # spectral, shape rule "rms"


def _reference(
    prob: LeastSquares,
    estimator: str,
    two_point: str,
    norm: str,
    *,
    beta: float,
    q: float = 0.3,
    gamma: float = 0.4,
    lr: float = 0.05,
    steps: int = 6,
    decay: bool = False,
) -> list[torch.Tensor]:
    """The Gluon-MVR, STORM and MARS equations written out in float64, one iterate per step."""
    x = prob.w0.clone()
    x_prev = g_last = m = est = torch.empty(0)
    out = []
    for k in range(steps):
        g = prob.grad(x, k)
        if k == 0:
            m, est = g.clone(), g.clone()
        else:
            gp = prob.grad(x_prev, k) if two_point == "exact" else g_last
            if estimator == "mvr1":
                m = g + beta * (m - gp)
            elif estimator == "storm":
                m = g + (1 - beta) * (m - gp)
            elif estimator == "mars":  # as MARS writes it: an EMA of the corrected gradient c
                c = g + gamma * beta / (1 - beta) * (g - gp)
                m = beta * m + (1 - beta) * c
            else:
                est = g + (1 - q) * (est - gp)
                m = beta * m + (1 - beta) * est
                if estimator == "mvr3":
                    m = m + beta * (g - gp)
        x_prev, g_last = x.clone(), g
        t = lr * (k + 1) ** -0.75 if decay else lr
        x = x + t * _lmo(norm, m)
        out.append(x.clone())
    return out


def _optimizer(prob: LeastSquares, **options: object) -> tuple[nn.Parameter, go.Gluon]:
    w = nn.Parameter(prob.w0.clone())
    # allow_degenerate: these tests check each recursion's arithmetic in both two-point modes,
    # and approx MVR-1/2/3 (a simpler method in disguise) is refused without the opt-in.
    opts: dict[str, object] = dict(
        lr=0.05, polar_method="svd", compute_dtype="float64", allow_degenerate=True
    )
    opts.update(options)
    return w, go.Gluon([w], **opts)


def _closure(
    prob: LeastSquares, w: nn.Parameter, opt: go.Gluon, k: int
) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = prob.loss(w, k)
        loss.backward()
        return loss

    return closure


def _run(prob: LeastSquares, w: nn.Parameter, opt: go.Gluon, steps: int = 6) -> list[torch.Tensor]:
    out = []
    for k in range(steps):
        opt.step(_closure(prob, w, opt, k))
        out.append(w.detach().clone())
    return out


def _run_with_block(
    prob: LeastSquares, w: nn.Parameter, opt: go.Gluon, steps: int = 6
) -> list[torch.Tensor]:
    out = []
    for k in range(steps):
        opt.zero_grad()
        with opt.previous_iterate():
            prob.loss(w, k).backward()
        prob.loss(w, k).backward()
        opt.step()
        out.append(w.detach().clone())
    return out


# -- the equations ---------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["euclidean", "spectral"])
@pytest.mark.parametrize("two_point", ["exact", "approx"])
@pytest.mark.parametrize("estimator", ["mvr1", "mvr2", "mvr3", "storm", "mars"])
def test_matches_float64_reference(estimator: str, two_point: str, norm: str) -> None:
    prob = LeastSquares(seed=1)
    beta = 0.3 if estimator == "storm" else 0.7
    ref = _reference(prob, estimator, two_point, norm, beta=beta)
    # STORM / LiMuon option 1 (its beta weighs the fresh gradient) is mvr1 with momentum 1 - beta.
    ours, momentum = ("mvr1", 1 - beta) if estimator == "storm" else (estimator, beta)
    w, opt = _optimizer(
        prob,
        norm=norm,
        estimator=ours,
        two_point=two_point,
        momentum=momentum,
        mvr_q=0.3,
        mars_gamma=0.4,
    )
    for k, (ours, expected) in enumerate(zip(_run(prob, w, opt), ref, strict=True)):
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12, msg=f"step {k}")


@pytest.mark.parametrize("two_point", ["exact", "approx"])
def test_mars_is_not_degenerate_and_spans_ema_to_mvr1(two_point: str) -> None:
    # With the previous step's gradient as g_prev, MVR-1 started at g^0 telescopes to M = g
    # (no momentum at all). MARS's damping gamma < 1 must keep a real momentum: its iterates
    # differ from momentum-free steps and from the EMA, by more than rounding.
    prob = LeastSquares(seed=3)

    def run(**options: object) -> list[torch.Tensor]:
        w, opt = _optimizer(prob, norm="euclidean", two_point=two_point, **options)
        return _run(prob, w, opt)

    mars = run(estimator="mars", momentum=0.9, mars_gamma=0.25)
    no_momentum = run(momentum=0.0)
    ema = _reference(prob, "mvr2", two_point, "euclidean", beta=0.9, q=1.0)  # EMA from g^0
    for other in (no_momentum, ema):
        assert (mars[-1] - other[-1]).abs().max() > 1e-6  # rounding is ~1e-15
    # The two ends: gamma = 0 is the EMA started at g^0, gamma = 1 is MVR-1.
    for a, b in zip(run(estimator="mars", momentum=0.9, mars_gamma=0.0), ema, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    mvr1 = run(estimator="mvr1", momentum=0.9)
    for a, b in zip(run(estimator="mars", momentum=0.9, mars_gamma=1.0), mvr1, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    if two_point == "approx":  # the collapse MARS's gamma avoids: gamma = 1 is M = g
        for a, b in zip(mvr1, no_momentum, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_theory_decay_decays_the_radius_and_keeps_the_momentum() -> None:
    # With a VR estimator `theory_decay` scales the radius by (k+1)^(-3/4); beta stays the
    # group's momentum (Gluon Theorem 2's beta schedule is for EMA momentum).
    prob = LeastSquares(seed=2)
    ref = _reference(prob, "mvr1", "exact", "euclidean", beta=0.6, decay=True)
    w, opt = _optimizer(
        prob, norm="euclidean", estimator="mvr1", momentum=0.6, radius_policy="theory_decay"
    )
    for ours, expected in zip(_run(prob, w, opt), ref, strict=True):
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)


def test_mvr1_with_point_independent_gradients_is_ema() -> None:
    # Linear losses f_k(X) = <C_k, X> have g_k(X^{k-1}) = g_k(X^k) = C_k, and MVR-1 becomes
    # M^k = C_k + beta (M^{k-1} - C_k), the EMA with the same beta. The ema estimator starts from
    # M = 0 and MVR from M^0 = g_0; C_0 = 0 makes both start at zero.
    gen = torch.Generator().manual_seed(3)
    cs = [torch.zeros(*SHAPE, dtype=F64)] + [
        torch.randn(*SHAPE, generator=gen, dtype=F64) for _ in range(6)
    ]
    w0 = torch.randn(*SHAPE, generator=gen, dtype=F64)
    runs = []
    for estimator in ("mvr1", "ema"):
        w = nn.Parameter(w0.clone())
        opt = go.Gluon([w], lr=0.1, norm="euclidean", estimator=estimator, momentum=0.8)
        for c in cs:

            def closure(
                c: torch.Tensor = c, w: nn.Parameter = w, opt: go.Gluon = opt
            ) -> torch.Tensor:
                opt.zero_grad()
                loss = (c * w).sum()
                loss.backward()
                return loss

            opt.step(closure)
        runs.append(w.detach().clone())
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=1e-12)


def test_mvr2_with_q_one_is_ema_bit_for_bit() -> None:
    # q = 1 drops the correction: G = g, and M = beta M + (1 - beta) g is the ema estimator's
    # own lerp. g_0 = 0 aligns the two starting points (see above).
    prob = LeastSquares(seed=4, zero_first=True)
    w, opt = _optimizer(prob, norm="spectral", estimator="mvr2", mvr_q=1.0, momentum=0.9)
    v, ema = _optimizer(prob, norm="spectral", estimator="ema", momentum=0.9)
    _run(prob, w, opt)
    _run(prob, v, ema)
    assert torch.equal(w, v)


def test_mvr3_with_q_one_is_mvr1() -> None:
    prob = LeastSquares(seed=5)
    w, opt = _optimizer(prob, norm="euclidean", estimator="mvr3", mvr_q=1.0, momentum=0.7)
    v, mvr1 = _optimizer(prob, norm="euclidean", estimator="mvr1", momentum=0.7)
    for a, b in zip(_run(prob, w, opt), _run(prob, v, mvr1), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("two_point", ["exact", "approx"])
def test_storm_is_mvr1_with_one_minus_beta(two_point: str) -> None:
    # LiMuon's beta multiplies the fresh gradient: the full-rank limuon preset with beta b is
    # mvr1 with momentum 1 - b. 1 - 0.25 is exact in binary, and the two run the same
    # operations, so the iterates agree bit for bit.
    prob = LeastSquares(seed=6)
    w = nn.Parameter(prob.w0.clone())
    opt = go.limuon(
        [w],
        lr=0.05,
        beta=0.25,
        low_rank=False,
        shape_rule="rms",
        two_point=two_point,
        compute_dtype="float64",
        allow_degenerate=True,  # approx full-rank LiMuon is M = g, refused without it
    )
    v, mvr1 = _optimizer(
        prob, norm="spectral", estimator="mvr1", momentum=0.75, two_point=two_point
    )
    _run(prob, w, opt)
    _run(prob, v, mvr1)
    assert torch.equal(w, v)
    assert torch.equal(opt.state[w]["momentum_buffer"], mvr1.state[v]["momentum_buffer"])


def test_first_step_uses_the_gradient() -> None:
    prob = LeastSquares(seed=7)
    for estimator in ("mvr1", "mvr2", "mvr3"):
        w, opt = _optimizer(prob, norm="euclidean", estimator=estimator, momentum=0.5)
        opt.step(_closure(prob, w, opt, 0))
        g0 = prob.grad(prob.w0, 0)
        assert torch.equal(opt.state[w]["momentum_buffer"], g0)
        assert torch.equal(opt.state[w]["prev_param"], prob.w0)
        if estimator in ("mvr2", "mvr3"):
            assert torch.equal(opt.state[w]["mvr_estimate"], g0)


# -- the two-point gradient ------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["mvr1", "mvr2", "mvr3"])
def test_closure_equals_previous_iterate_block(estimator: str) -> None:
    prob = LeastSquares(seed=8)
    opts = dict(norm="spectral", estimator=estimator, momentum=0.4)
    w, opt = _optimizer(prob, **opts)
    v, other = _optimizer(prob, **opts)
    for a, b in zip(_run(prob, w, opt), _run_with_block(prob, v, other), strict=True):
        assert torch.equal(a, b)


def test_closure_is_called_twice_per_step_in_exact_mode() -> None:
    prob = LeastSquares(seed=9)
    calls = []
    for two_point in ("exact", "approx"):
        w, opt = _optimizer(prob, norm="euclidean", estimator="mvr2", two_point=two_point)
        for k in range(4):
            inner = _closure(prob, w, opt, k)
            count = [0]

            def closure(
                inner: Callable[[], torch.Tensor] = inner, count: list[int] = count
            ) -> torch.Tensor:
                count[0] += 1
                return inner()

            assert isinstance(opt.step(closure), torch.Tensor)
            calls.append((two_point, count[0]))
    assert calls == [("exact", 1)] + [("exact", 2)] * 3 + [("approx", 1)] * 4


def test_closure_returns_the_loss_at_the_current_iterate() -> None:
    prob = LeastSquares(seed=10)
    w, opt = _optimizer(prob, norm="euclidean", estimator="mvr1")
    for k in range(3):
        expected = prob.loss(w.detach(), k)
        assert torch.equal(opt.step(_closure(prob, w, opt, k)), expected)


def test_grad_after_step_is_the_current_gradient_and_not_aliased() -> None:
    prob = LeastSquares(seed=11)
    w, opt = _optimizer(prob, norm="euclidean", estimator="mvr2", two_point="exact")
    for k in range(3):
        x_k = w.detach().clone()
        grads: list[tuple[torch.Tensor, torch.Tensor]] = []  # (point, .grad object) per call
        inner = _closure(prob, w, opt, k)

        def closure(
            inner: Callable[[], torch.Tensor] = inner,
            grads: list[tuple[torch.Tensor, torch.Tensor]] = grads,
        ) -> torch.Tensor:
            loss = inner()
            grads.append((w.detach().clone(), w.grad))
            return loss

        opt.step(closure)
        assert len(grads) == (1 if k == 0 else 2)
        at_x_k = [g for point, g in grads if torch.equal(point, x_k)]
        assert len(at_x_k) == 1 and w.grad is at_x_k[0], ".grad must be the call at X^k's"
        assert torch.equal(w.grad, prob.grad(x_k, k)), "p.grad must be g_k(X^k)"
        ptrs = {t.untyped_storage().data_ptr() for t in opt.state[w].values()}
        for _, g in grads:  # neither call's gradient storage is kept by the state
            assert g.untyped_storage().data_ptr() not in ptrs
        saved = {key: t.clone() for key, t in opt.state[w].items()}
        w.grad.mul_(-3.0)  # user code touching .grad must not reach the state
        for key, t in opt.state[w].items():
            assert torch.equal(t, saved[key]), key
        w.grad = prob.grad(x_k, k)


def _snapshot(params: list[torch.Tensor], opt: go.Gluon) -> tuple[list[torch.Tensor], dict]:
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()["state"])


def _assert_unchanged(
    params: list[torch.Tensor], opt: go.Gluon, snap: tuple[list[torch.Tensor], dict]
) -> None:
    values, state = snap
    for p, v in zip(params, values, strict=True):
        assert torch.equal(p, v)
    now = opt.state_dict()["state"]
    assert now.keys() == state.keys()
    for i, s in state.items():
        assert now[i].keys() == s.keys()
        for key, v in s.items():
            assert torch.equal(now[i][key], v), f"state {i}/{key} changed"


def test_exact_mode_without_second_gradient_raises_and_changes_nothing(tiny: TinyNet) -> None:
    opt = go.gluon_mvr(tiny, 2, lr=0.01)
    x = torch.randint(0, 23, (2, 6))
    lm_loss(tiny, x).backward()
    opt.step()  # the first step needs no second gradient
    opt.zero_grad()
    lm_loss(tiny, x).backward()
    grads = {n: p.grad.clone() for n, p in tiny.named_parameters()}
    params = list(tiny.parameters())
    snap = _snapshot(params, opt)
    with pytest.raises(RuntimeError) as info:
        opt.step()
    text = str(info.value)
    for needle in (
        "param group(s) 0 (estimator 'mvr2', role 'embedding')",
        "two_point='exact'",
        "opt.step(closure)",
        "opt.previous_iterate()",
        "two_point='approx'",
        "nothing was changed",
        "'fc.weight'",
    ):
        assert needle in text, needle
    _assert_unchanged(params, opt, snap)
    for n, p in tiny.named_parameters():
        assert torch.equal(p.grad, grads[n])


def test_closure_without_gradient_at_previous_point_raises_and_changes_nothing() -> None:
    prob = LeastSquares(seed=12)
    w, opt = _optimizer(prob, norm="euclidean", estimator="mvr1")
    opt.step(_closure(prob, w, opt, 0))
    calls = [0]

    def closure() -> torch.Tensor:
        calls[0] += 1
        opt.zero_grad()
        loss = prob.loss(w, 1)
        if calls[0] == 2:  # no backward at the previous iterate (the first call)
            loss.backward()
        return loss

    snap = _snapshot([w], opt)
    with pytest.raises(
        RuntimeError, match=r"closure.s call at the previous iterate produced no gradient"
    ):
        opt.step(closure)
    _assert_unchanged([w], opt, snap)


def test_nonfinite_second_gradient_raises_and_changes_nothing() -> None:
    prob = LeastSquares(seed=13)
    w, opt = _optimizer(prob, norm="euclidean", estimator="mvr1", momentum=0.8)
    opt.step(_closure(prob, w, opt, 0))
    calls = [0]

    def closure() -> torch.Tensor:
        calls[0] += 1
        opt.zero_grad()
        loss = prob.loss(w, 1) * (float("nan") if calls[0] == 1 else 1.0)
        loss.backward()
        return loss

    snap = _snapshot([w], opt)
    with pytest.raises(
        FloatingPointError, match=r"Non-finite gradient in parameter\(s\) \['params\[0\]'\]"
    ):
        opt.step(closure)
    _assert_unchanged([w], opt, snap)


def test_previous_iterate_block_swaps_and_restores() -> None:
    prob = LeastSquares(seed=14)
    w, opt = _optimizer(prob, norm="euclidean", estimator="mvr1")
    bias = nn.Parameter(torch.randn(3, dtype=F64))  # an ema group: never swapped
    opt.add_param_group({"params": [bias], "estimator": "ema"})

    # First step: no previous iterate, the block runs at X^0 and keeps nothing.
    with opt.previous_iterate():
        assert torch.equal(w, prob.w0)
        prob.loss(w, 0).backward()
    assert w.grad is None and "prev_point_grad" not in opt.state.get(w, {})
    opt.step(_closure(prob, w, opt, 0))

    x1 = w.detach().clone()
    b1 = bias.detach().clone()
    w.grad = marker = torch.ones_like(w)  # .grad before the block survives it
    with opt.previous_iterate():
        assert torch.equal(w, prob.w0) and torch.equal(bias, b1)
        assert w.grad is None
        (prob.loss(w, 1) + bias.sum()).backward()
    assert w.grad is marker and bias.grad is None
    assert torch.equal(w, x1)
    assert torch.equal(opt.state[w]["prev_point_grad"], prob.grad(prob.w0, 1))

    # A second block accumulates, as .grad does.
    with opt.previous_iterate():
        prob.loss(w, 1).backward()
    torch.testing.assert_close(
        opt.state[w]["prev_point_grad"], 2 * prob.grad(prob.w0, 1), rtol=0, atol=0
    )

    # A failing block restores everything and keeps nothing new.
    kept = opt.state[w]["prev_point_grad"].clone()
    with pytest.raises(KeyError), opt.previous_iterate():
        prob.loss(w, 1).backward()
        raise KeyError("boom")
    assert torch.equal(w, x1) and w.grad is marker
    assert torch.equal(opt.state[w]["prev_point_grad"], kept)

    # step() consumes it.
    w.grad = prob.grad(x1, 1)
    opt.step()
    assert "prev_point_grad" not in opt.state[w]


def test_step_with_closure_ignores_a_block_gradient() -> None:
    prob = LeastSquares(seed=15)
    w, opt = _optimizer(prob, norm="euclidean", estimator="mvr1")
    v, ref = _optimizer(prob, norm="euclidean", estimator="mvr1")
    opt.step(_closure(prob, w, opt, 0))
    ref.step(_closure(prob, v, ref, 0))
    with opt.previous_iterate():
        prob.loss(w, 5).backward()  # a different batch: must not be used
    opt.step(_closure(prob, w, opt, 1))
    ref.step(_closure(prob, v, ref, 1))
    assert torch.equal(w, v) and "prev_point_grad" not in opt.state[w]


def test_only_exact_groups_are_swapped() -> None:
    # The closure's call at the previous point (the first of the two) sees X^{k-1} on exact VR
    # groups and X^k everywhere else; the second call sees X^k.
    prob = LeastSquares(seed=16)
    w = nn.Parameter(prob.w0.clone())
    a = nn.Parameter(torch.randn(4, 3, dtype=F64))
    b = nn.Parameter(torch.randn(4, 3, dtype=F64))
    opt = go.Gluon(
        [
            {"params": [w], "estimator": "mvr1"},
            {"params": [a], "estimator": "mvr1", "two_point": "approx", "allow_degenerate": True},
            {"params": [b], "algorithm": "adamw"},
        ],
        lr=0.01,
        norm="euclidean",
    )
    seen: list[tuple[torch.Tensor, ...]] = []

    def closure() -> torch.Tensor:
        seen.append((w.detach().clone(), a.detach().clone(), b.detach().clone()))
        opt.zero_grad()
        loss = prob.loss(w, 0) + (a**2).sum() + (b**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    before = (w.detach().clone(), a.detach().clone(), b.detach().clone())
    seen.clear()
    opt.step(closure)
    assert len(seen) == 2
    assert torch.equal(seen[0][0], prob.w0) and torch.equal(seen[1][0], before[0])
    for j in (1, 2):
        assert torch.equal(seen[0][j], before[j]) and torch.equal(seen[1][j], before[j])
    assert opt.state_bytes()["two_point"] == 15 * 8 + 12 * 8  # w: prev_param; a: prev_grad


# -- checkpoints and memory ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("estimator", "two_point", "keys"),
    [
        ("mvr2", "exact", {"momentum_buffer", "mvr_estimate", "prev_param"}),
        ("mvr1", "approx", {"momentum_buffer", "prev_grad"}),
        ("mvr3", "approx", {"momentum_buffer", "mvr_estimate", "prev_grad"}),
    ],
)
def test_state_dict_round_trip_and_bit_identical_resume(
    estimator: str, two_point: str, keys: set[str]
) -> None:
    prob = LeastSquares(seed=17, steps=8)
    opts = dict(norm="spectral", estimator=estimator, two_point=two_point, momentum=0.6)
    w, opt = _optimizer(prob, **opts)
    for k in range(3):
        opt.step(_closure(prob, w, opt, k))
    buf = io.BytesIO()
    torch.save({"w": w.detach().clone(), "opt": opt.state_dict()}, buf)
    for k in range(3, 8):
        opt.step(_closure(prob, w, opt, k))

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert set(saved["opt"]["state"][0]) == {"step", *keys}
    assert saved["opt"]["param_groups"][0]["estimator"] == estimator
    v = nn.Parameter(saved["w"])
    resumed = go.Gluon(
        [v],
        **{
            **dict(lr=0.05, polar_method="svd", compute_dtype="float64", allow_degenerate=True),
            **opts,
        },
    )
    resumed.load_state_dict(saved["opt"])
    for k in range(3, 8):
        resumed.step(_closure(prob, v, resumed, k))
    assert torch.equal(w, v)


def test_state_bytes() -> None:
    n = 15 * 8  # a 5x3 float64 matrix
    prob = LeastSquares(seed=18)
    for estimator, two_point, momentum, two in [
        ("ema", "exact", 1, 0),
        ("mvr1", "exact", 1, 1),
        ("mvr1", "approx", 1, 1),
        ("mvr2", "exact", 2, 1),
        ("mvr3", "approx", 2, 1),
    ]:
        w, opt = _optimizer(
            prob, norm="euclidean", estimator=estimator, two_point=two_point, momentum=0.5
        )
        assert opt.state_bytes() == {"momentum": 0, "two_point": 0, "total": 0}
        _run(prob, w, opt, steps=2)
        sizes = opt.state_bytes()
        assert sizes["momentum"] == momentum * n, estimator
        assert sizes["two_point"] == two * n, estimator
        assert sizes["total"] == (momentum + two) * n + 4  # + the float32 step counter
    # AdamW's moments count as momentum.
    p = nn.Parameter(torch.randn(4, 2))
    opt = go.Gluon([p], algorithm="adamw")
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state_bytes() == {"momentum": 2 * 8 * 4, "two_point": 0, "total": 2 * 8 * 4 + 4}


def test_switching_estimator_drops_stale_state() -> None:
    prob = LeastSquares(seed=19)
    w, opt = _optimizer(prob, norm="euclidean", estimator="mvr2")
    _run(prob, w, opt, steps=2)
    opt.param_groups[0]["estimator"] = "ema"
    w.grad = prob.grad(w, 2)
    opt.step()
    assert set(opt.state[w]) == {"step", "momentum_buffer"}
    opt.param_groups[0].update(estimator="mvr1", two_point="approx")
    w.grad = prob.grad(w, 3)
    opt.step()  # no previous gradient yet: this one step is an EMA step, no error
    assert set(opt.state[w]) == {"step", "momentum_buffer", "prev_grad"}


# -- validation ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"estimator": "mvr2", "mvr_q": 1.5}, r"Invalid mvr_q: 1.5 .*in \[0, 1\]"),
        ({"mvr_q": -0.1}, "Invalid mvr_q"),
        ({"mvr_q": "0.1"}, "Invalid mvr_q"),
        ({"estimator": "mvr1", "two_point": "both"}, "Unknown two_point 'both'"),
        ({"estimator": "mars", "mars_gamma": 1.5}, r"Invalid mars_gamma: 1.5 .*in \[0, 1\]"),
        ({"rank": 0}, r"Invalid rank: 0 .*int >= 1"),
        ({"rank": 2.0}, "Invalid rank: 2.0"),
        ({"oversampling": -1}, r"Invalid oversampling: -1 .*int >= 0"),
        ({"rsvd_seed": 1.5}, "Invalid rsvd_seed: 1.5"),
        ({"rsvd_seed": True}, "Invalid rsvd_seed"),
        ({"estimator": "storm"}, r"estimator='storm' .*was replaced in 0.2.0 by 'mvr1'"),
        ({"estimator": "storm_lowrank", "momentum": 1.5}, r"Invalid momentum: 1.5 .*in \[0, 1\)"),
        ({"estimator": "mvr1", "momentum": 1.0}, "Invalid momentum: 1.0"),
        (
            {"estimator": "mvr1", "nesterov": True},
            "nesterov=True is defined for estimator='ema' only",
        ),
        ({"algorithm": "adamw", "estimator": "mvr1"}, "estimator='mvr1' needs algorithm='lmo'"),
    ],
)
def test_invalid_options(kwargs: dict, message: str) -> None:
    p = nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match=message):
        go.Gluon([p], **kwargs)


def test_storm_momentum_one_is_allowed() -> None:
    # LiMuon's beta = 1 (momentum 0) keeps no correction: M = g, plain normalised steps.
    prob = LeastSquares(seed=20)
    w, opt = _optimizer(prob, norm="euclidean", estimator="mvr1", momentum=0.0)
    v, plain = _optimizer(prob, norm="euclidean", momentum=0.0)
    for a, b in zip(_run(prob, w, opt), _run(prob, v, plain), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


def test_invalid_option_set_after_construction_is_caught_before_any_change() -> None:
    prob = LeastSquares(seed=21)
    w, opt = _optimizer(prob, norm="euclidean", estimator="mvr2")
    _run(prob, w, opt, steps=2)
    opt.param_groups[0]["mvr_q"] = 2.0
    snap = _snapshot([w], opt)
    with pytest.raises(ValueError, match=r"Invalid mvr_q: 2.0 \(param group 0\)"):
        opt.step(_closure(prob, w, opt, 2))
    _assert_unchanged([w], opt, snap)


# -- the preset ------------------------------------------------------------------------------------
def test_gluon_mvr_preset(tiny: TinyNet) -> None:
    opt = go.gluon_mvr(tiny, 3, lr=0.01, momentum=0.8, mvr_q=0.2)
    assert {g["role"] for g in opt.param_groups} == {
        "embedding",
        "hidden",
        "conv",
        "head",
        "bias",
        "norm",
    }
    for g in opt.param_groups:
        assert (g["algorithm"], g["estimator"], g["momentum"], g["mvr_q"], g["two_point"]) == (
            "lmo",
            "mvr3",
            0.8,
            0.2,
            "exact",
        )
    hidden = next(g for g in opt.param_groups if g["role"] == "hidden")
    assert hidden["norm"] == "spectral" and hidden["shape_rule"] == "rms"
    with pytest.raises(ValueError, match="variant must be 1, 2 or 3"):
        go.gluon_mvr(tiny, 4)
    for variant, what in ((1, "no momentum"), (2, "EMA started at g"), (3, "mars_gamma=1")):
        with pytest.raises(ValueError, match=f"not variance reduction for MVR-{variant}.*{what}"):
            go.gluon_mvr(tiny, variant, two_point="approx")
    groups = go.param_groups(tiny, "gluon_mvr", variant=2, settings={"head": {"scale": 10.0}})
    assert all(g["estimator"] == "mvr2" and g["two_point"] == "exact" for g in groups)
    assert next(g for g in groups if g["role"] == "head")["scale"] == 10.0


@pytest.mark.parametrize("variant", [1, 2, 3])
def test_gluon_mvr_trains_in_exact_mode(variant: int, tiny: TinyNet) -> None:
    opt = go.gluon_mvr(tiny, variant, lr=0.02)
    first, last = closure_losses(tiny, opt, 15)
    assert last < 0.93 * first


@pytest.mark.parametrize("foreach", [False, True])
def test_momentum_init_gradient_is_gluons_algorithm_1(foreach: bool) -> None:
    # M^0 = g^0, then M <- beta M + (1 - beta) g: the float64 reference of the EMA from g^0
    # (MVR-2 with q = 1), in both the loop and the multi-tensor path.
    prob = LeastSquares(seed=31)
    ref = _reference(prob, "mvr2", "exact", "spectral", beta=0.8, q=1.0)
    w, opt = _optimizer(
        prob, norm="spectral", momentum=0.8, momentum_init="gradient", foreach=foreach
    )
    for ours, expected in zip(_run(prob, w, opt), ref, strict=True):
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    # The default start differs from the second step on (by the transient beta^(k+1) g^0).
    v, zero = _optimizer(prob, norm="spectral", momentum=0.8, foreach=foreach)
    assert not torch.allclose(_run(prob, v, zero)[-1], ref[-1], rtol=0, atol=1e-6)


def test_approx_mode_reduces_each_mvr_variant_to_a_simpler_method() -> None:
    """What gluon_mvr refuses approx mode for: with the previous step's gradient as g_prev,
    MVR-1 is momentum-free steps (for every beta), MVR-2 the EMA started at g^0 and MVR-3 MARS
    with gamma = 1 (both for every q)."""
    prob = LeastSquares(seed=4)

    def run(**options: object) -> list[torch.Tensor]:
        w, opt = _optimizer(prob, norm="euclidean", two_point="approx", **options)
        return _run(prob, w, opt)

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-12)

    for beta in (0.5, 0.9):
        same(run(estimator="mvr1", momentum=beta), run(estimator="ema", momentum=0.0))
    ema_g0 = run(estimator="ema", momentum=0.9, momentum_init="gradient", nesterov=False)
    mars1 = run(estimator="mars", momentum=0.9, mars_gamma=1.0)
    for q in (0.1, 0.9):
        same(run(estimator="mvr2", momentum=0.9, mvr_q=q), ema_g0)
        same(run(estimator="mvr3", momentum=0.9, mvr_q=q), mars1)
