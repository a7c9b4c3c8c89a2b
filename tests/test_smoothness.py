"""Layer-wise (L0, L1)-smoothness: the probe, the penalised fit and the theoretical radii."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import gluon_optim as go
from conftest import TinyNet, lm_loss

sm = go.smoothness
F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # The tensors here are tiny: one thread is faster, and immune to a busy machine's
    # oversubscription (bfloat16 Newton-Schulz on 2 contended threads is ~100x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 23, (4, 9), generator=gen) for _ in range(n)]


def _train(
    model: nn.Module,
    opt: go.Gluon,
    batches: list[torch.Tensor],
    *,
    closure: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> None:
    for k, x in enumerate(batches):
        if closure:

            def fn(x: torch.Tensor = x) -> torch.Tensor:
                opt.zero_grad()
                loss = lm_loss(model, x)
                loss.backward()
                return loss

            opt.step(fn)
        else:
            opt.zero_grad()
            lm_loss(model, x).backward()
            if on_step is not None:
                on_step(k)
            opt.step()


# ---------------------------------------------------------------------------------------------
# The probe never changes the numerics
# ---------------------------------------------------------------------------------------------

MAKERS: dict[str, tuple[Callable[[nn.Module], go.Gluon], bool]] = {
    "muon+adamw": (lambda m: go.muon(m, lr=0.02, adamw_lr=1e-2), False),
    "unscion": (lambda m: go.unscion(m, lr=0.001), False),
    "gluon-l0l1": (lambda m: go.gluon(m, lr=1.0, radius_policy="l0l1", l0=0.01, l1=40.0), False),
    "mvr1-exact-closure": (lambda m: go.gluon_mvr(m, 1, lr=0.02), True),
}


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("case", sorted(MAKERS))
def test_probe_leaves_parameters_grads_and_state_bit_identical(case: str, every: int) -> None:
    make, closure = MAKERS[case]
    batches = _batches(5)
    base = TinyNet()
    runs = []
    for with_probe in (False, True):
        model = copy.deepcopy(base)
        opt = make(model)
        probe = sm.SmoothnessProbe(opt, every, exact_dual=every == 2) if with_probe else None
        _train(model, opt, batches, closure=closure)
        runs.append((model, opt))
        if probe is not None:
            assert len(probe.records) > 0
            probe.remove()
    (m0, o0), (m1, o1) = runs
    for (name, p0), p1 in zip(m0.named_parameters(), m1.parameters(), strict=True):
        assert torch.equal(p0, p1), name
        assert (p0.grad is None) == (p1.grad is None), name
        if p0.grad is not None:
            assert torch.equal(p0.grad, p1.grad), name
    s0, s1 = o0.state_dict()["state"], o1.state_dict()["state"]
    assert s0.keys() == s1.keys()
    for i in s0:
        assert s0[i].keys() == s1[i].keys()
        for key in s0[i]:
            assert torch.equal(s0[i][key], s1[i][key]), (i, key)


# ---------------------------------------------------------------------------------------------
# The probe measures the right thing
# ---------------------------------------------------------------------------------------------


def _quadratic_run(
    group: dict[str, Any], x0: torch.Tensor, c: float, steps: int = 4
) -> list[sm.SmoothnessRecord]:
    """Gluon without momentum on f(X) = 0.5 c ||X||_F^2, whose gradient is c X."""
    p = nn.Parameter(x0.clone())
    opt = go.Gluon([{"params": [("w", p)], "role": "hidden", **group}], lr=0.05, momentum=0.0)
    probe = sm.SmoothnessProbe(opt, 1)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * c * (p**2).sum()).backward()
        opt.step()
    return probe.records


def test_euclidean_norm_on_a_quadratic_gives_its_curvature() -> None:
    # dg = c dX, so ||dg||_2 / ||dX||_2 = c exactly, at every step.
    records = _quadratic_run({"norm": "euclidean"}, torch.randn(7, dtype=F64), c=2.5)
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert r["L_hat"] == pytest.approx(2.5, rel=1e-12)
        assert r["L_hat_euclid"] == pytest.approx(2.5, rel=1e-12)
        assert r["update_norm"] == pytest.approx(0.05, rel=1e-12)  # ||t lmo|| = t
        assert r["note"] == ""


def test_spectral_norm_on_least_squares_gives_the_derived_constant() -> None:
    # f(W) = 0.5 ||W Z||_F^2 with Z Z^T = c I, so g = c W and dg = c dW. The step is
    # dW = -t s U V^T (s = sqrt(d_out/d_in), exact polar factor of a full-rank W), so
    #   ||dg||_* = s ||c dW||_nuc = c s (t s) r,   ||dW|| = ||dW||_2 / s = t,
    # and L_hat = c s^2 r with r = min(d_out, d_in): here c * (4/6) * 4. In Frobenius norms
    # L_hat = c exactly.
    d_out, d_in, c = 4, 6, 3.0
    q, _ = torch.linalg.qr(torch.randn(9, d_in, dtype=F64))  # 9 x 6, orthonormal columns
    z = math.sqrt(c) * q.T  # (6, 9): Z Z^T = c I
    p = nn.Parameter(torch.randn(d_out, d_in, dtype=F64))
    opt = go.Gluon(
        [{"params": [("w", p)], "norm": "spectral", "polar_method": "svd"}], lr=0.05, momentum=0
    )
    probe = sm.SmoothnessProbe(opt, 1, exact_dual=True)
    for _ in range(4):
        opt.zero_grad()
        (0.5 * (p @ z).pow(2).sum()).backward()
        opt.step()
    assert len(probe.records) == 3
    for r in probe.records:
        assert r["L_hat"] == pytest.approx(c * (d_out / d_in) * min(d_out, d_in), rel=1e-9)
        assert r["L_hat_euclid"] == pytest.approx(c, rel=1e-12)
        assert r["update_norm"] == pytest.approx(0.05, rel=1e-9)


def test_half_precision_parameters_are_differenced_in_float32() -> None:
    # bfloat16 parameters and gradients: differences and norms are taken in float32, so the
    # record agrees with a float64 computation from the same bfloat16 values to float32
    # precision (in bfloat16 the norms alone would be off by ~1e-3).
    p = nn.Parameter((torch.randn(64) / 4).to(torch.bfloat16))
    opt = go.Gluon([{"params": [("w", p)], "norm": "euclidean"}], lr=0.05, momentum=0.0)
    probe = sm.SmoothnessProbe(opt, 2)
    xs, gs = [], []
    for _ in range(4):
        opt.zero_grad()
        (0.5 * 3.0 * (p.float() ** 2).sum()).backward()
        xs.append(p.detach().double())
        gs.append(p.grad.double())
        opt.step()
    xs.append(p.detach().double())
    assert p.grad.dtype == torch.bfloat16
    for r in probe.records:
        k = r["step"] - 1
        dx, dg = xs[k + 1] - xs[k], gs[k + 1] - gs[k]
        assert r["L_hat"] == pytest.approx(float(dg.norm() / dx.norm()), rel=1e-6)
        assert r["grad_dual"] == pytest.approx(float(gs[k + 1].norm()), rel=1e-6)
        assert r["update_norm"] == pytest.approx(float(dx.norm()), rel=1e-6)


def test_sign_norm_on_a_quadratic_gives_the_derived_constant() -> None:
    # sign norm ||A|| = n max|A_ij| (n = d_in), dual sum|G_ij| / n. The step is
    # dW = -(t / n) sign(c W): every entry has size t/n, so ||dW|| = t and
    # ||c dW||_* = c m n (t/n) / n; L_hat = c m / n.
    m, n, c = 5, 8, 1.5
    records = _quadratic_run({"norm": "sign"}, torch.randn(m, n, dtype=F64), c=c)
    for r in records:
        assert r["norm"] == "sign"
        assert r["L_hat"] == pytest.approx(c * m / n, rel=1e-12)


def _operand(group: dict[str, Any], norm: go.norms.Norm, t: torch.Tensor) -> torch.Tensor:
    # Written out independently of the optimizer: embeddings are transposed, other matrices
    # flattened to (d_out, rest); conv/vector/tensor norms see the tensor itself.
    if norm.kind != "matrix":
        return t
    return t.T if group["transposed"] else t.reshape(t.shape[0], -1)


@pytest.mark.parametrize("exact_dual", [False, True])
def test_probe_matches_a_hand_computation_for_every_role(exact_dual: bool) -> None:
    model = TinyNet()
    opt = go.unscion(model, lr=0.002)  # colnorm (T), spectral, spectral_conv, sign, bias_rms
    probe = sm.SmoothnessProbe(opt, 3, exact_dual=exact_dual)
    params: list[dict[str, torch.Tensor]] = []
    grads: list[dict[str, torch.Tensor]] = []

    def keep(_: int) -> None:
        params.append({n: p.detach().clone() for n, p in model.named_parameters()})
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})

    _train(model, opt, _batches(7), on_step=keep)
    assert sorted({r["step"] for r in probe.records}) == [3, 6]
    groups = {n: g for g in opt.param_groups for n in g["param_names"]}
    assert {r["param"] for r in probe.records} == set(groups)
    for r in probe.records:
        k, name = r["step"] - 1, r["param"]
        group = groups[name]
        p = dict(model.named_parameters())[name]
        norm = go.resolve_norm(group, p)
        if exact_dual and norm.name in ("spectral", "spectral_conv"):
            norm = dataclasses.replace(norm, method="svd")
        dx = params[k + 1][name] - params[k][name]
        dg = grads[k + 1][name] - grads[k][name]
        expect = float(norm.dual(_operand(group, norm, dg)).sum()) / float(
            norm.norm(_operand(group, norm, dx)).amax()
        )
        assert r["role"] == group["role"]
        assert r["norm"] == norm.name
        assert r["L_hat"] == pytest.approx(expect, rel=1e-5), name
        g1 = _operand(group, norm, grads[k + 1][name])
        assert r["grad_dual"] == pytest.approx(float(norm.dual(g1).sum()), rel=1e-5)
        assert r["L_hat_euclid"] == pytest.approx(float(dg.norm() / dx.norm()), rel=1e-5)
        assert r["grad_fro"] == pytest.approx(float(grads[k + 1][name].norm()), rel=1e-5)


def test_closure_steps_measure_the_gradients_the_step_used() -> None:
    # With step(closure) the gradient is computed inside the step (MVR exact mode calls the
    # closure at X^(k-1), then at X^k): the probe reads .grad after the step, which then holds
    # g_k(X^k). Replayed by hand on a copy of the same model.
    base = TinyNet()
    batches = _batches(4)
    model = copy.deepcopy(base)
    opt = go.gluon_mvr(model, 1, lr=0.02)
    probe = sm.SmoothnessProbe(opt, 2)
    _train(model, opt, batches, closure=True)
    assert {r["step"] for r in probe.records} == {2}

    hand = copy.deepcopy(base)
    hand_opt = go.gluon_mvr(hand, 1, lr=0.02)
    xs: list[torch.Tensor] = []
    gs: list[torch.Tensor] = []
    for x in batches[:3]:

        def fn(x: torch.Tensor = x) -> torch.Tensor:
            hand_opt.zero_grad()
            loss = lm_loss(hand, x)
            loss.backward()
            return loss

        xs.append(hand.fc.weight.detach().clone())
        hand_opt.step(fn)
        gs.append(hand.fc.weight.grad.detach().clone())
    rec = next(r for r in probe.records if r["param"] == "fc.weight")
    assert rec["L_hat_euclid"] == pytest.approx(
        float((gs[2] - gs[1]).norm() / (xs[2] - xs[1]).norm())
    )
    assert rec["grad_fro"] == pytest.approx(float(gs[2].norm()))


def test_adamw_groups_are_skipped() -> None:
    model = TinyNet()
    opt = go.muon(model, lr=0.02)
    probe = sm.SmoothnessProbe(opt, 1)
    _train(model, opt, _batches(3))
    assert {r["param"] for r in probe.records} == {"fc.weight", "conv.weight"}
    assert {r["role"] for r in probe.records} == {"hidden", "conv"}


def test_records_are_plain_names_or_global_indices() -> None:
    a = nn.Parameter(torch.randn(3, 4))
    b = nn.Parameter(torch.randn(4))
    opt = go.Gluon([{"params": [a]}, {"params": [b], "lr": 0.01}], lr=0.02)
    probe = sm.SmoothnessProbe(opt, 1)
    for _ in range(2):
        opt.zero_grad()
        ((a.sum(0) * b).sum() ** 2).backward()
        opt.step()
    assert [r["param"] for r in probe.records] == ["params[0]", "params[1]"]
    assert [r["norm"] for r in probe.records] == ["spectral", "bias_rms"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("exact_dual", [False, True])
def test_probe_on_cuda_is_bit_identical_and_finite(exact_dual: bool) -> None:
    batches = [x.cuda() for x in _batches(4)]
    base = TinyNet().cuda()
    runs = []
    for with_probe in (False, True):
        model = copy.deepcopy(base)
        opt = go.unscion(model, lr=0.001)
        probe = sm.SmoothnessProbe(opt, 1, exact_dual=exact_dual) if with_probe else None
        _train(model, opt, batches)
        runs.append(model)
    assert probe is not None and len(probe.records) == 3 * 8
    assert all(r["L_hat"] is not None and math.isfinite(r["L_hat"]) for r in probe.records)
    for p0, p1 in zip(runs[0].parameters(), runs[1].parameters(), strict=True):
        assert torch.equal(p0, p1)


# ---------------------------------------------------------------------------------------------
# Bad data: never a crash, never a NaN
# ---------------------------------------------------------------------------------------------


def _strict_json(line: str) -> Any:
    def no_constant(name: str) -> Any:
        raise AssertionError(f"JSON holds {name}")

    return json.loads(line, parse_constant=no_constant)


def test_zero_update_and_missing_gradient_give_none_with_a_note(tmp_path: Path) -> None:
    w = nn.Parameter(torch.randn(3, 4))
    frozen = nn.Parameter(torch.randn(4), requires_grad=False)
    opt = go.Gluon([{"params": [("w", w), ("frozen", frozen)], "role": "hidden"}], lr=0.0)
    sink = tmp_path / "run" / "smooth.jsonl"
    probe = sm.SmoothnessProbe(opt, 1, sink=sink)
    for _ in range(3):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
    by_param = {r["param"]: r for r in probe.records if r["step"] == 2}
    assert by_param["w"]["L_hat"] is None and by_param["w"]["L_hat_euclid"] is None
    assert "zero update" in by_param["w"]["note"]
    assert by_param["w"]["grad_dual"] is not None and by_param["w"]["update_norm"] == 0.0
    assert by_param["frozen"]["L_hat"] is None
    assert "no gradient at step 1" in by_param["frozen"]["note"]
    lines = sink.read_text().splitlines()
    assert len(lines) == len(probe.records) == 4
    assert [_strict_json(line) for line in lines] == probe.records
    assert sm.read_records(sink) == probe.records


def test_non_finite_gradients_are_notes_not_nans(tmp_path: Path) -> None:
    w = nn.Parameter(torch.randn(3, 4))
    opt = go.Gluon([{"params": [("w", w)], "nonfinite": "skip"}], lr=0.1)
    sink = tmp_path / "s.jsonl"
    probe = sm.SmoothnessProbe(opt, 1, sink=sink)
    for k in range(4):
        opt.zero_grad()
        (w**2).sum().backward()
        if k == 2:
            w.grad[0, 0] = float("nan")
        opt.step()  # skipped at k = 2
    notes = {r["step"]: r["note"] for r in probe.records}
    assert "non-finite gradient at step 2" in notes[2]
    assert "non-finite gradient at step 2" in notes[3]
    assert "zero update" not in notes[3]  # the non-finite gradient is the reason given
    for line in sink.read_text().splitlines():
        rec = _strict_json(line)
        assert rec["L_hat"] is None or math.isfinite(rec["L_hat"])
    assert probe.records[0]["L_hat"] is not None  # the clean pair (0, 1)


def test_an_unwritable_sink_warns_once_and_keeps_the_records(tmp_path: Path) -> None:
    w = nn.Parameter(torch.randn(3, 4))
    opt = go.Gluon([w], lr=0.1)
    probe = sm.SmoothnessProbe(opt, 1, sink=tmp_path)  # a directory: open() fails
    with pytest.warns(RuntimeWarning, match="cannot write") as caught:
        for _ in range(4):
            opt.zero_grad()
            (w**2).sum().backward()
            opt.step()
    assert len(caught) == 1 and len(probe.records) == 3


def test_a_step_that_raises_drops_its_pair_and_the_run_goes_on() -> None:
    w = nn.Parameter(torch.randn(3, 4))
    opt = go.Gluon([{"params": [("w", w)]}], lr=0.1)  # nonfinite="raise"
    probe = sm.SmoothnessProbe(opt, 1)
    for k in range(5):
        opt.zero_grad()
        (w**2).sum().backward()
        if k == 2:
            w.grad[0, 0] = float("inf")
            with pytest.raises(FloatingPointError):
                opt.step()
            continue
        opt.step()
    # Pairs (1, 2) and (2, 3) lost their step-2 gradient; (0, 1) and (3, 4) are measured.
    assert [r["step"] for r in probe.records] == [1, 4]
    assert all(r["L_hat"] is not None for r in probe.records)


def test_remove_detaches_the_hooks_and_frees_the_copies() -> None:
    model = TinyNet()
    opt = go.unscion(model, lr=0.001)
    with sm.SmoothnessProbe(opt, 2) as probe:
        _train(model, opt, _batches(2))  # X^1 and g_1 are held for the pair (1, 2)
        assert probe._first is not None
    assert probe._first is None and probe._second is None
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    n = len(probe.records)
    _train(model, opt, _batches(4))
    assert len(probe.records) == n
    probe.remove()  # twice is fine


def test_start_step_and_bad_arguments() -> None:
    w = nn.Parameter(torch.randn(3, 4))
    opt = go.Gluon([w], lr=0.1)
    probe = sm.SmoothnessProbe(opt, 50, start_step=148, euclidean=False)
    for _ in range(3):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()  # steps 148, 149, 150: the pair (149, 150)
    assert [r["step"] for r in probe.records] == [150]
    assert "L_hat_euclid" not in probe.records[0]
    with pytest.raises(ValueError, match="every must be an int >= 1"):
        sm.SmoothnessProbe(opt, 0)
    with pytest.raises(TypeError, match="needs a gluon_optim.Gluon"):
        sm.SmoothnessProbe(torch.optim.SGD([w], lr=0.1))  # type: ignore[arg-type]


def test_read_records_skips_a_truncated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text('{"step": 1, "L_hat": 2.0}\n{"step": 2, "L_h')
    assert sm.read_records(path) == [{"step": 1, "L_hat": 2.0}]
    path.write_text('{"step": 1\n{"step": 2}\n')
    with pytest.raises(ValueError, match="s.jsonl:1"):
        sm.read_records(path)


# ---------------------------------------------------------------------------------------------
# The fit
# ---------------------------------------------------------------------------------------------


def _objective(a: float, b: float, x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    a_, b_ = np.asarray(a)[..., None], np.asarray(b)[..., None]
    r = y - a_ - b_ * x
    return (r**2).sum(-1) + lam * (np.maximum(r, 0.0) ** 2).sum(-1)


DATASETS: dict[str, Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
    # The paper's regime: L0 ~ 0, L1 ~ 70, g in [0.02, 0.09], multiplicative noise.
    "nanogpt-like": lambda r: (
        (x := r.uniform(0.02, 0.09, 99)),
        70 * x * (1 + 0.1 * r.standard_normal(99)),
    ),
    "intercept": lambda r: ((x := r.uniform(0, 5, 40)), 2 + 3 * x + r.standard_normal(40)),
    "falling": lambda r: ((x := r.uniform(0, 1, 30)), 5 - 2 * x + 0.1 * r.standard_normal(30)),
    "equal-x": lambda r: (np.full(12, 0.5), 1 + r.uniform(0, 1, 12)),
    "outliers": lambda r: (
        (x := r.uniform(0, 2, 25)),
        1 + x + np.where(r.uniform(size=25) < 0.2, 10.0, 0.0),
    ),
}


@pytest.mark.parametrize("penalty", [0.0, 5.0, 50.0])
@pytest.mark.parametrize("name", sorted(DATASETS))
def test_fit_is_the_true_minimiser(name: str, penalty: float) -> None:
    x, y = DATASETS[name](np.random.default_rng(len(name)))
    lower = 1e-6
    fit = sm.fit_l0_l1((y, x), penalty)
    assert fit.l0 is not None and fit.l1 is not None
    assert fit.l0 >= lower and fit.l1 >= lower
    best = float(_objective(fit.l0, fit.l1, x, y, penalty))
    # A brute-force grid, coarse over a wide box and then fine around its own minimum.
    a_hi = 2 * max(fit.l0, float(y.max()))
    b_hi = 2 * max(fit.l1, float(y.max() / max(x.mean(), 1e-3)))
    aa, bb = np.meshgrid(np.linspace(lower, a_hi, 401), np.linspace(lower, b_hi, 401))
    vals = _objective(aa, bb, x, y, penalty)
    i = np.unravel_index(vals.argmin(), vals.shape)
    da, db = a_hi / 400, b_hi / 400
    aa, bb = np.meshgrid(
        np.linspace(max(lower, aa[i] - da), aa[i] + da, 201),
        np.linspace(max(lower, bb[i] - db), bb[i] + db, 201),
    )
    grid = float(_objective(aa, bb, x, y, penalty).min())
    assert best <= grid * (1 + 1e-12) + 1e-12
    # Optimality: no feasible nearby point is better (the objective is convex).
    for step in (1e-3, 1e-6):
        for sa, sb in ((1, 0), (-1, 0), (0, 1), (0, -1), (1, -1), (-1, 1), (1, 1), (-1, -1)):
            a2 = max(lower, fit.l0 + sa * step * max(1.0, fit.l0))
            b2 = max(lower, fit.l1 + sb * step * max(1.0, fit.l1))
            assert float(_objective(a2, b2, x, y, penalty)) >= best * (1 - 1e-12) - 1e-12


def test_fit_is_never_worse_than_the_papers_lbfgsb() -> None:
    optimize = pytest.importorskip("scipy.optimize")
    for name, make in DATASETS.items():
        x, y = make(np.random.default_rng(7))

        def f(z: np.ndarray, x: np.ndarray = x, y: np.ndarray = y) -> float:
            return float(_objective(z[0], z[1], x, y, 5.0))

        ref = optimize.minimize(f, [1.0, 1.0], bounds=[(1e-6, None), (1e-6, None)])
        fit = sm.fit_l0_l1((y, x))
        assert f(np.array([fit.l0, fit.l1])) <= ref.fun * (1 + 1e-9) + 1e-12, name


def test_fit_recovers_noiseless_constants() -> None:
    x = [0.01 * k for k in range(1, 40)]
    fit = sm.fit_l0_l1(([0.3 + 7.0 * v for v in x], x))
    assert fit.l0 == pytest.approx(0.3, rel=1e-9) and fit.l1 == pytest.approx(7.0, rel=1e-9)
    assert fit.mse_rel == pytest.approx(0.0, abs=1e-20)
    # L0 = 0 lies outside the bounds: the fit sits on L0 = lower.
    fit = sm.fit_l0_l1(([70.0 * v for v in x], x))
    assert fit.l0 == pytest.approx(1e-6) and fit.l1 == pytest.approx(70.0, rel=1e-6)


def test_fit_recovers_noisy_constants() -> None:
    rng = random.Random(3)
    x = [rng.uniform(0.5, 3.0) for _ in range(400)]
    y = [2.0 + 4.0 * v + rng.gauss(0.0, 0.3) for v in x]
    plain = sm.fit_l0_l1((y, x), 0.0)
    assert plain.l0 == pytest.approx(2.0, abs=0.15) and plain.l1 == pytest.approx(4.0, rel=0.03)
    # With the penalty the line moves up by about a noise-sized shift, keeping the slope.
    pen = sm.fit_l0_l1((y, x), 5.0)
    assert pen.l1 == pytest.approx(4.0, rel=0.05)
    assert 0.05 < (pen.l0 or 0.0) - (plain.l0 or 0.0) < 0.6


def test_penalty_pushes_the_fit_above_the_points() -> None:
    rng = random.Random(5)
    x = [rng.uniform(0.02, 0.09) for _ in range(99)]
    y = [70 * v * (1 + 0.1 * rng.gauss(0.0, 1.0)) for v in x]

    def under(fit: sm.Fit) -> int:  # points the fit under-estimates
        assert fit.l0 is not None and fit.l1 is not None
        return sum(yi > fit.l0 + fit.l1 * xi for xi, yi in zip(x, y, strict=True))

    fits = [sm.fit_l0_l1((y, x), lam) for lam in (0.0, 5.0, 50.0)]
    counts = [under(f) for f in fits]
    assert counts[0] > counts[1] > counts[2]
    mid = sum(x) / len(x)
    heights = [(f.l0 or 0.0) + (f.l1 or 0.0) * mid for f in fits]
    assert heights[0] < heights[1] < heights[2]


def test_mse_rel_is_the_mean_squared_relative_error() -> None:
    x, y = [1.0, 2.0, 3.0, 4.0], [1.0, 2.5, 2.5, 4.5]
    fit = sm.fit_l0_l1((y, x), 0.0, lower=0.0)
    assert fit.l0 is not None and fit.l1 is not None
    expect = sum(((b - fit.l0 - fit.l1 * a) / b) ** 2 for a, b in zip(x, y, strict=True)) / 4
    assert fit.mse_rel == pytest.approx(expect, rel=1e-12)
    assert (fit.l0, fit.l1) == pytest.approx((0.0, 1.05), abs=1e-12)  # OLS: 0 + 1.05 x


def test_too_little_data_gives_none_not_an_error() -> None:
    recs = [
        {"L_hat": 2.0, "grad_dual": 0.1},
        {"L_hat": None, "grad_dual": 0.2},
        {"L_hat": float("nan"), "grad_dual": 0.2},
        {"L_hat": 3.0, "grad_dual": 0.3},
    ]
    fit = sm.fit_l0_l1(recs)
    assert (fit.l0, fit.l1, fit.mse_rel, fit.n_points) == (None, None, None, 2)
    assert "too few points" in fit.note and "dropped 2" in fit.note
    assert sm.fit_l0_l1([]).n_points == 0
    degenerate = sm.fit_l0_l1(([1.0, 2.0, 3.0], [0.5, 0.5, 0.5]))
    assert degenerate.l1 is not None and "identified" in degenerate.note
    with pytest.raises(ValueError, match="penalty"):
        sm.fit_l0_l1(recs, -1.0)
    with pytest.raises(ValueError, match="different lengths"):
        sm.fit_l0_l1(([1.0, 2.0], [1.0]))


def test_fit_records_by_param_and_by_role() -> None:
    recs: list[dict[str, Any]] = []
    for k in range(1, 6):
        g = 0.1 * k
        recs.append({"param": "a", "role": "hidden", "L_hat": 10 * g, "grad_dual": g})
        recs.append({"param": "b", "role": "hidden", "L_hat": 20 * g, "grad_dual": g})
        recs.append({"param": "c", "role": "head", "L_hat": 0.5 * g, "grad_dual": g})
        recs.append({"param": "c", "role": "head", "L_hat": None, "grad_dual": g})
    by_param = sm.fit_records(recs)
    assert list(by_param) == ["a", "b", "c"]
    assert by_param["b"].l1 == pytest.approx(20.0, rel=1e-6) and by_param["b"].role == "hidden"
    assert by_param["c"].n_points == 5 and "dropped 5" in by_param["c"].note
    by_role = sm.fit_records(recs, by="role")
    assert list(by_role) == ["hidden", "head"] and by_role["hidden"].n_points == 10
    euclid = [{"L_hat_euclid": 3 * g, "grad_fro": g} for g in (0.1, 0.2, 0.3)]
    assert sm.fit_l0_l1(euclid, euclidean=True).l1 == pytest.approx(3.0, rel=1e-5)


def test_fit_of_a_probe_run_recovers_the_quadratic_curvature() -> None:
    # End to end: f(x) = 0.5 c ||x||^2, euclidean norm. L_hat = c at every step, so the fit
    # puts the whole constant in L0 (L1 at its bound) -- a quadratic is L-smooth.
    records = _quadratic_run({"norm": "euclidean"}, torch.randn(9, dtype=F64), c=4.0, steps=8)
    fit = sm.fit_records(records)["w"]
    assert fit.l0 is not None and fit.l1 is not None
    assert fit.l0 + fit.l1 * records[-1]["grad_dual"] == pytest.approx(4.0, rel=1e-6)
    assert fit.l1 == pytest.approx(1e-6, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# From fits to radii
# ---------------------------------------------------------------------------------------------

PAPER = {
    "h.4.attn.c_q": sm.Fit(1e-6, 68.4167, 0.01, 99, role="hidden"),
    "h.4.mlp.c_fc": sm.Fit(1e-6, 69.9247, 0.01, 99, role="hidden"),
    "wte": sm.Fit(1e-6, 1.3305, 0.02, 99, role="tied"),
    "short": sm.Fit(None, None, None, 1, "too few points", role="bias"),
}


def test_theoretical_radii_and_settings() -> None:
    radii = sm.theoretical_radii(PAPER)
    expect = {"h.4.attn.c_q": 0.014616, "h.4.mlp.c_fc": 0.014301, "wte": 0.751597}
    assert radii == pytest.approx(expect, rel=1e-4)
    with pytest.raises(ValueError, match=r"\['short'\] have no constants"):
        sm.radius_settings(PAPER)
    settings = sm.radius_settings(PAPER, skip_missing=True)
    assert settings == {
        # hidden takes the larger L1 of its matrices
        "hidden": {"radius_policy": "l0l1", "l0": 1e-6, "l1": 69.9247, "scale": 1.0},
        "tied": {"radius_policy": "l0l1", "l0": 1e-6, "l1": 1.3305, "scale": 1.0},
    }
    per_param = sm.radius_settings(PAPER, by="param", skip_missing=True)
    assert per_param["h.4.attn.c_q"]["l1"] == 68.4167


def test_round_trip_fits_to_settings_to_gluon_steps_one_over_l1(tmp_path: Path) -> None:
    model = TinyNet()
    l1 = {"embedding": 2.0, "hidden": 4.0, "norm": 5.0, "bias": 8.0, "conv": 10.0, "head": 0.5}
    fits = {role: sm.Fit(0.0, v, 0.0, 10, role=role) for role, v in l1.items()}
    sm.save_fits(tmp_path / "fits.json", fits, meta={"run": "test"})
    loaded = sm.load_fits(tmp_path / "fits.json")
    assert loaded == fits
    settings = sm.radius_settings(loaded)
    opt = go.gluon(model, lr=1.0, settings=settings, polar_method="svd", momentum=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    lm_loss(model, _batches(1)[0]).backward()
    opt.step()
    # With L0 = 0 the l0l1 radius is t = ||g||_* / (L1 ||g||_*) = 1/L1, and ||lmo|| = 1, so
    # every layer moves exactly 1/L1 in its own norm.
    for group in opt.param_groups:
        for name, p in zip(group["param_names"], group["params"], strict=True):
            norm = go.resolve_norm(group, p)
            dx = _operand(group, norm, p.detach() - before[name])
            moved = float(norm.norm(dx).amax())
            assert moved == pytest.approx(1.0 / l1[group["role"]], rel=1e-5), name


def test_compare_radii_against_a_tuned_configuration() -> None:
    model = TinyNet()
    opt = go.unscion(model, lr=0.00036)
    fits = {
        "fc.weight": sm.Fit(1e-6, 70.0, 0.01, 99, role="hidden"),
        "head": sm.Fit(1e-6, 1.25, 0.01, 99, role="head"),
    }
    rows = {r["param"]: r for r in sm.compare_radii(fits, opt)}
    fc = rows["fc.weight"]
    assert fc["radius"] == pytest.approx(0.018) and fc["theory_radius"] == pytest.approx(1 / 70)
    assert fc["ratio"] == pytest.approx(0.018 * 70) and fc["policy"] == "constant"
    head = rows["head.weight"]  # found through its role
    assert head["theory_radius"] == pytest.approx(0.8) and head["radius"] == pytest.approx(1.08)
    assert rows["conv.weight"]["l1"] is None and rows["conv.weight"]["ratio"] is None
    l0l1 = go.gluon(model, lr=1.0, radius_policy="l0l1", l1=70.0)
    assert all(r["radius"] is None for r in sm.compare_radii(fits, l0l1))


def test_load_fits_rejects_malformed_files(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON file"):
        sm.load_fits(path)
    path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a smoothness fits file"):
        sm.load_fits(path)
    good = {"format": "gluon-optim/smoothness-fits", "version": 1, "fits": {"a": {"l0": 1}}}
    path.write_text(json.dumps(good))
    with pytest.raises(ValueError, match="fit 'a' is malformed"):
        sm.load_fits(path)
    sm.save_fits(path, {"x": sm.Fit(None, None, None, 0, "too few points")})
    assert sm.load_fits(path)["x"].l1 is None
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write leaves no temporary file


def test_each_expert_of_a_stack_is_a_layer_of_its_own() -> None:
    """A parameter with ``blocks`` gives one record per LMO unit, ``name[u]``, whose values are
    those of the unit's own ``(d_out, d_in)`` matrix (GPT-OSS's transposed layout here)."""
    gen = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.randn(3, 8, 12, generator=gen, dtype=F64) * 0.3)
    target = torch.randn(3, 8, 12, generator=gen, dtype=F64)
    opt = go.Gluon(
        [{"params": [("experts.w", w)], "blocks": "experts", "transposed": True, "lr": 0.02}]
    )
    probe = sm.SmoothnessProbe(opt, 1, exact_dual=True)
    points, grads = [], []
    for step in range(3):
        opt.zero_grad()
        ((torch.tanh(w) - target * math.cos(step)) ** 2).sum().backward()
        assert w.grad is not None
        points.append(w.detach().clone())
        grads.append(w.grad.detach().clone())
        opt.step()
    assert [r["param"] for r in probe.records if r["step"] == 1] == [
        "experts.w[0]",
        "experts.w[1]",
        "experts.w[2]",
    ]
    norm = go.norms.get("spectral", method="svd")
    for r in probe.records:
        k, u = r["step"] - 1, int(r["param"][-2])
        dx = (points[k + 1][u] - points[k][u]).T  # (d_out, d_in) of expert u
        dg = (grads[k + 1][u] - grads[k][u]).T
        assert r["L_hat"] == pytest.approx(float(norm.dual(dg) / norm.norm(dx)), rel=1e-9)
        assert r["grad_dual"] == pytest.approx(float(norm.dual(grads[k + 1][u].T)), rel=1e-9)
