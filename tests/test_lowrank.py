"""Randomized SVD, the low-rank STORM momentum (LiMuon option 2) and the limuon preset."""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import gluon_optim as go
from conftest import TinyNet, closure_losses
from gluon_optim.lowrank import reconstruct, rsvd, sketch_seed

F64 = torch.float64


def _low_rank_matrix(m: int, n: int, r: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=gen, dtype=F64) @ torch.randn(r, n, generator=gen, dtype=F64)


# -- rsvd ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("m", "n", "r", "s"), [(30, 20, 4, 5), (12, 40, 3, 0), (16, 16, 5, 2)])
def test_rsvd_recovers_an_exactly_low_rank_matrix(m: int, n: int, r: int, s: int) -> None:
    a = _low_rank_matrix(m, n, r)
    before = a.clone()
    u, sv, v = rsvd(a, r, oversampling=s, seed=7)
    assert u.shape == (m, r) and sv.shape == (r,) and v.shape == (n, r)
    torch.testing.assert_close(reconstruct(u, sv, v), a, rtol=0, atol=1e-10)
    eye = torch.eye(r, dtype=F64)
    torch.testing.assert_close(u.T @ u, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(v.T @ v, eye, rtol=0, atol=1e-12)
    assert bool((sv[:-1] >= sv[1:]).all())
    torch.testing.assert_close(sv, torch.linalg.svdvals(a)[:r], rtol=1e-10, atol=0)
    assert torch.equal(a, before), "rsvd must not modify its input"


def test_rsvd_is_reproducible_from_its_seed() -> None:
    a = torch.randn(25, 18, dtype=F64)
    first = rsvd(a, 4, seed=3)
    again = rsvd(a, 4, seed=3)
    other = rsvd(a, 4, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])  # a full-rank input: the sketch matters


def test_rsvd_at_full_rank_reproduces_any_matrix() -> None:
    a = torch.randn(9, 6, dtype=F64)
    for rank in (6, 50):
        u, s, v = rsvd(a, rank, oversampling=3, seed=1)
        assert s.shape == (6,), "rank is capped at min(m, n)"
        torch.testing.assert_close(reconstruct(u, s, v), a, rtol=0, atol=1e-12)


def test_rsvd_of_zero_is_zero_and_half_precision_computes_in_float32() -> None:
    u, s, v = rsvd(torch.zeros(6, 4), 2, seed=0)
    assert torch.equal(reconstruct(u, s, v), torch.zeros(6, 4))
    u, s, v = rsvd(torch.randn(6, 4).bfloat16(), 2, seed=0)
    assert u.dtype == s.dtype == v.dtype == torch.float32


def test_rsvd_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="need a matrix"):
        rsvd(torch.randn(3), 1)
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        rsvd(torch.randn(3, 3), 0)
    with pytest.raises(ValueError, match="oversampling must be an int >= 0"):
        rsvd(torch.randn(3, 3), 1, oversampling=-2)


def test_sketch_seed_is_deterministic_and_separates_its_inputs() -> None:
    seeds = {
        sketch_seed(s, k, i, role)
        for s in (0, 1)
        for k in range(5)
        for i in range(5)
        for role in ("", "hidden")
    }
    assert len(seeds) == 2 * 5 * 5 * 2
    assert sketch_seed(3, 4, 5, "conv") == sketch_seed(3, 4, 5, "conv")
    assert all(0 <= s < 2**63 for s in seeds)
    assert 0 <= sketch_seed(-1, 0, 0) < 2**63


# -- the optimizer ---------------------------------------------------------------------------------
class Problem:
    """Least squares over a matrix and a conv kernel: f_k = sum of mean squared residuals / 2."""

    def __init__(self, seed: int = 0, steps: int = 8) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.w0 = torch.randn(6, 4, generator=gen, dtype=F64)
        self.c0 = torch.randn(5, 2, 3, generator=gen, dtype=F64)  # flattened 5 x 6
        self.data = [
            tuple(
                torch.randn(*s, generator=gen, dtype=F64) for s in ((9, 4), (9, 6), (9, 6), (9, 5))
            )
            for _ in range(steps)
        ]

    def params(self) -> tuple[nn.Parameter, nn.Parameter]:
        return nn.Parameter(self.w0.clone()), nn.Parameter(self.c0.clone())

    def loss(self, w: torch.Tensor, c: torch.Tensor, k: int) -> torch.Tensor:
        x, y, xc, yc = self.data[k]
        return (
            0.5 * ((x @ w.T - y) ** 2).mean() + 0.5 * ((xc @ c.reshape(5, -1).T - yc) ** 2).mean()
        )

    def closure(
        self, opt: go.Gluon, w: torch.Tensor, c: torch.Tensor, k: int
    ) -> Callable[[], torch.Tensor]:
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = self.loss(w, c, k)
            loss.backward()
            return loss

        return closure


def _opt(params: tuple[nn.Parameter, ...], **options: object) -> go.Gluon:
    opts: dict[str, object] = dict(
        lr=0.05, norm="spectral", polar_method="svd", compute_dtype="float64", momentum=0.7
    )
    opts.update(options)
    return go.Gluon(list(params), **opts)


def _run(
    prob: Problem, opt: go.Gluon, w: nn.Parameter, c: nn.Parameter, steps: int, start: int = 0
) -> None:
    for k in range(start, start + steps):
        opt.step(prob.closure(opt, w, c, k))


@pytest.mark.parametrize("two_point", ["exact", "approx"])
@pytest.mark.parametrize("norm", ["spectral", "euclidean"])
def test_full_rank_storm_lowrank_equals_storm(norm: str, two_point: str) -> None:
    prob = Problem(seed=1)
    w, c = prob.params()
    v, d = prob.params()
    low = _opt(
        (w, c), norm=norm, estimator="storm_lowrank", rank=6, oversampling=2, two_point=two_point
    )
    # Approx MVR-1 is M = g (refused without the opt-in); the truncated state keeps
    # storm_lowrank's approx correction, so only full rank meets it.
    full = _opt((v, d), norm=norm, estimator="mvr1", two_point=two_point, allow_degenerate=True)
    for k in range(6):
        low.step(prob.closure(low, w, c, k))
        full.step(prob.closure(full, v, d, k))
        torch.testing.assert_close(w, v, rtol=0, atol=1e-10, msg=f"step {k}")
        torch.testing.assert_close(c, d, rtol=0, atol=1e-10, msg=f"step {k}")


def test_storm_lowrank_matches_reference() -> None:
    # LiMuon option 2 written out: the momentum used at step k is M^k = g_k(X^k) + (1 - beta)
    # (M_hat^{k-1} - g_k(X^{k-1})), and M_hat^k = rsvd(M^k) with the seed of (rsvd_seed, k,
    # position in group, role).
    prob = Problem(seed=2)
    w, c = prob.params()
    opt = _opt((w,), estimator="storm_lowrank", rank=2, oversampling=1, rsvd_seed=11)
    beta, lr = 0.3, 0.05
    x = prob.w0.clone()
    x_prev = m_hat = torch.empty(0)

    def grad(point: torch.Tensor, k: int) -> torch.Tensor:
        p = point.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(prob.loss(p, prob.c0, k), p)
        return g

    for k in range(6):
        opt.step(prob.closure(opt, w, c, k))
        g = grad(x, k)
        m = g if k == 0 else g + (1 - beta) * (m_hat - grad(x_prev, k))
        m_hat = reconstruct(*rsvd(m, 2, oversampling=1, seed=sketch_seed(11, k, 0, "")))
        u, _, vh = torch.linalg.svd(m, full_matrices=False)
        x_prev, x = x, x - lr * math.sqrt(6 / 4) * u @ vh
        torch.testing.assert_close(w.detach(), x, rtol=0, atol=1e-12, msg=f"step {k}")


def test_storm_lowrank_state_is_the_factors_and_state_bytes_count_them() -> None:
    prob = Problem(seed=3)
    w, c = prob.params()
    r = 2
    opt = _opt((w, c), estimator="storm_lowrank", rank=r)
    _run(prob, opt, w, c, 2)
    for p, (m, n) in ((w, (6, 4)), (c, (5, 6))):
        state = opt.state[p]
        assert set(state) == {"step", "lowrank_u", "lowrank_s", "lowrank_v", "prev_param"}
        assert state["lowrank_u"].shape == (m, r)
        assert state["lowrank_s"].shape == (r,)
        assert state["lowrank_v"].shape == (n, r)
    sizes = opt.state_bytes()
    factors = ((6 + 4) * r + r) + ((5 + 6) * r + r)
    assert sizes["momentum"] == factors * 8
    assert sizes["two_point"] == (6 * 4 + 5 * 6) * 8  # the previous iterate, exact mode
    assert sizes["total"] == sizes["momentum"] + sizes["two_point"] + 2 * 4


def test_storm_lowrank_round_trip_and_bit_identical_resume() -> None:
    prob = Problem(seed=4, steps=7)
    w, c = prob.params()
    options = dict(estimator="storm_lowrank", rank=2, oversampling=2, rsvd_seed=5)
    opt = _opt((w, c), **options)
    _run(prob, opt, w, c, 3)
    buf = io.BytesIO()
    torch.save({"w": w.detach().clone(), "c": c.detach().clone(), "opt": opt.state_dict()}, buf)
    _run(prob, opt, w, c, 4, start=3)

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert {"lowrank_u", "lowrank_s", "lowrank_v", "prev_param"} <= set(saved["opt"]["state"][0])
    v, d = nn.Parameter(saved["w"]), nn.Parameter(saved["c"])
    resumed = _opt((v, d), **options)
    resumed.load_state_dict(saved["opt"])
    _run(prob, resumed, v, d, 4, start=3)
    assert torch.equal(w, v) and torch.equal(c, d)


def test_storm_lowrank_closure_equals_previous_iterate_block() -> None:
    prob = Problem(seed=5)
    w, c = prob.params()
    v, d = prob.params()
    opt = _opt((w, c), estimator="storm_lowrank", rank=2)
    other = _opt((v, d), estimator="storm_lowrank", rank=2)
    for k in range(5):
        opt.step(prob.closure(opt, w, c, k))
        other.zero_grad()
        with other.previous_iterate():
            prob.loss(v, d, k).backward()
        prob.loss(v, d, k).backward()
        other.step()
        assert torch.equal(w, v) and torch.equal(c, d)


def test_storm_lowrank_needs_matrices() -> None:
    with pytest.raises(
        ValueError, match=r"Parameter 'b'.*storm_lowrank' needs a matrix .*shape \(4,\)"
    ):
        go.Gluon([("b", nn.Parameter(torch.randn(4)))], estimator="storm_lowrank")
    # Switched on after construction: caught at step(), before anything changes.
    b = nn.Parameter(torch.randn(4))
    opt = go.Gluon([b], estimator="mvr1", momentum=0.5, two_point="approx", allow_degenerate=True)
    b.grad = torch.ones(4)
    opt.step()
    before = b.detach().clone()
    state = {k: v.clone() for k, v in opt.state[b].items()}
    opt.param_groups[0]["estimator"] = "storm_lowrank"
    with pytest.raises(ValueError, match="storm_lowrank' needs a matrix"):
        opt.step()
    assert torch.equal(b, before)
    assert all(torch.equal(opt.state[b][k], v) for k, v in state.items())


def test_storm_lowrank_keeps_the_parameter_dtype() -> None:
    p = nn.Parameter(torch.randn(8, 6, dtype=torch.bfloat16))
    opt = go.Gluon([p], estimator="storm_lowrank", momentum=0.8, rank=2, two_point="approx")
    for k in range(3):
        p.grad = torch.randn(8, 6, generator=torch.Generator().manual_seed(k)).bfloat16()
        opt.step()
    assert all(t.dtype == torch.bfloat16 for key, t in opt.state[p].items() if key != "step")
    assert torch.isfinite(p).all()


# -- the preset ------------------------------------------------------------------------------------
def test_limuon_preset_groups(tiny: TinyNet) -> None:
    opt = go.limuon(tiny, 4, lr=0.01)
    by_role = {g["role"]: g for g in opt.param_groups}
    for role in ("hidden", "conv"):
        g = by_role[role]
        assert (g["algorithm"], g["norm"], g["shape_rule"], g["polar_method"]) == (
            "lmo",
            "spectral",
            "none",
            "svd",
        )
        assert (g["estimator"], g["rank"], g["momentum"], g["two_point"]) == (
            "storm_lowrank",
            4,
            0.9,  # LiMuon's beta 0.1 weighs the fresh gradient: momentum = 1 - beta
            "exact",
        )
    for role in ("embedding", "head", "bias", "norm"):
        assert by_role[role]["algorithm"] == "adamw"
        assert by_role[role]["estimator"] == "ema"
    full = go.limuon(tiny, low_rank=False, method="newton_schulz", shape_rule="muon")
    hidden = next(g for g in full.param_groups if g["role"] == "hidden")
    assert (hidden["estimator"], hidden["polar_method"], hidden["shape_rule"]) == (
        "mvr1",
        "newton_schulz",
        "muon",
    )
    with pytest.raises(ValueError, match="limuon: unknown method 'qr'"):
        go.limuon(tiny, method="qr")
    with pytest.raises(ValueError, match="limuon takes matrices"):
        go.limuon(list(tiny.parameters()))
    with pytest.raises(ValueError, match="Invalid rank: 0"):
        go.limuon(tiny, 0)
    params = go.limuon([tiny.fc.weight, tiny.conv.weight], 2, two_point="approx")
    assert params.param_groups[0]["estimator"] == "storm_lowrank"


def test_limuon_trains_in_exact_mode(tiny: TinyNet) -> None:
    opt = go.limuon(tiny, 4, lr=0.02, adamw_lr=1e-2)
    first, last = closure_losses(tiny, opt, 25)
    assert last < 0.8 * first
    rank = 4
    expected = ((20 + 12) * rank + rank + (20 + 60) * rank + rank) * 4  # fc, conv: float32
    adamw = sum(
        2 * p.numel() * 4
        for g in opt.param_groups
        if g["algorithm"] == "adamw"
        for p in g["params"]
    )
    assert opt.state_bytes()["momentum"] == expected + adamw
