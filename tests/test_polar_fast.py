"""The fast Newton–Schulz paths against the reference: Gram form, form="auto", the PE schedule."""

from __future__ import annotations

import pytest
import torch

from _bf16 import ExactBF16Products
from gluon_optim.polar import (
    GRAM_MIN_DIM,
    GRAM_RESTARTS,
    NS_PRESETS,
    gram_newton_schulz,
    newton_schulz,
    ns_cost,
    polar_express_schedule,
    polar_svd,
    relative_error,
)

RECT = [(24, 72), (72, 24), (16, 64), (3, 2, 16, 40), (10, 31)]


def _decaying(m: int, n: int, power: float, seed: int = 0) -> torch.Tensor:
    """``U diag(i^-power) V^T`` with random orthonormal ``U``, ``V`` (float32)."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen))
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -power
    return (u * s) @ v.T


@pytest.mark.parametrize("shape", RECT + [(20, 20)])
@pytest.mark.parametrize("preset", ["jordan", "polar_express"])
def test_gram_form_equals_standard_in_float64(shape: tuple[int, ...], preset: str) -> None:
    # In exact arithmetic the Gram recurrence produces the same iterate; float64 shows it.
    g = torch.randn(*shape, dtype=torch.float64)
    ref = newton_schulz(g, preset=preset, steps=5, dtype=None)
    for restarts in ((), GRAM_RESTARTS, (1, 3)):
        out = gram_newton_schulz(g, preset=preset, steps=5, dtype=None, restarts=restarts)
        assert out.shape == g.shape
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    via_form = newton_schulz(g, preset=preset, steps=5, dtype=None, form="gram")
    torch.testing.assert_close(via_form, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 8])
def test_gram_form_any_step_count(steps: int) -> None:
    g = torch.randn(12, 40, dtype=torch.float64)
    ref = newton_schulz(g, preset="polar_express", steps=steps, dtype=None)
    out = newton_schulz(g, preset="polar_express", steps=steps, dtype=None, form="gram")
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(128, 384), (384, 96)])
@pytest.mark.parametrize("power", [0.0, 0.5, 1.0, 1.5])
def test_gram_bf16_as_accurate_as_standard(shape: tuple[int, int], power: float) -> None:
    # The restart is what keeps bfloat16 stable on ill-conditioned inputs. With it the Gram
    # form's error against U V^T stays within 25% (+0.01) of the standard form's on every
    # spectrum (power 0: Gaussian; worst case 0.181 against 0.146 at power 1.5, k = 96) and
    # below Jordan's quintic, which torch.optim.Muon uses. The products are bfloat16 rounded
    # once from exact values (tests/_bf16.py), so the margins hold on every CPU; this CPU's
    # own kernels gave the same errors to 4e-4.
    g = torch.randn(*shape) if power == 0.0 else _decaying(*shape, power)
    ref = polar_svd(g.double())
    with ExactBF16Products() as mode:
        std = relative_error(newton_schulz(g, preset="polar_express", steps=5), ref)
        gram = relative_error(newton_schulz(g, preset="polar_express", steps=5, form="gram"), ref)
        jordan = relative_error(newton_schulz(g, preset="jordan", steps=5), ref)
    assert mode.products > 0
    assert gram <= 1.25 * std + 0.01
    assert gram < jordan


def test_gram_without_restart_is_unstable_in_bf16() -> None:
    # Why GRAM_RESTARTS exists: the naive Gram recurrence amplifies bf16 round-off in X X^T.
    # Shown with every product rounded once from its exact value (tests/_bf16.py): the best
    # any bfloat16 kernel can do, so a CPU that accumulates better cannot make it go away.
    # Measured: error 7e9 without the restart, 0.17 with it.
    g = _decaying(96, 288, 1.5)
    ref = polar_svd(g.double())
    with ExactBF16Products() as mode:
        naive = gram_newton_schulz(g, steps=5, restarts=())
        restarted = gram_newton_schulz(g, steps=5)
    assert mode.products > 0
    assert not torch.isfinite(naive).all() or relative_error(naive, ref) > 2.0
    assert relative_error(restarted, ref) < 0.7


def test_gram_zero_input_and_no_aliasing() -> None:
    z = torch.zeros(8, 32)
    assert newton_schulz(z, form="gram").abs().max() == 0
    g = torch.randn(8, 32)
    before = g.clone()
    newton_schulz(g, preset="polar_express", dtype=None, form="gram")
    assert torch.equal(g, before)


def test_auto_picks_the_cheaper_form() -> None:
    g = torch.randn(GRAM_MIN_DIM, 3 * GRAM_MIN_DIM)
    auto = newton_schulz(g, preset="polar_express", form="auto")
    assert torch.equal(auto, newton_schulz(g, preset="polar_express", form="gram"))
    assert torch.equal(newton_schulz(g.T, form="auto"), newton_schulz(g.T, form="gram"))
    # Square, or short side below GRAM_MIN_DIM: the standard form, bit for bit.
    for shape in ((GRAM_MIN_DIM, GRAM_MIN_DIM), (GRAM_MIN_DIM - 1, 4 * GRAM_MIN_DIM)):
        x = torch.randn(*shape)
        assert torch.equal(newton_schulz(x, form="auto"), newton_schulz(x))


def test_ns_cost_counts() -> None:
    # 5 steps, one restart before iteration 2: 4r + 14 against 10r + 5 (docstring derivation).
    for r in (1, 2, 3, 4, 8):
        assert ns_cost(64, 64 * r, 5, "gram") == 4 * r + 14
        assert ns_cost(64 * r, 64, 5, "standard") == 10 * r + 5
    assert ns_cost(64, 64, 5, "gram", restarts=()) == 2 + 3 + 4 + 4 + 4 + 2
    assert ns_cost(64, 100, 1, "gram") == 2 * 2 + 1  # r rounds up
    with pytest.raises(ValueError, match="form"):
        ns_cost(8, 8, 5, "auto")


def test_form_errors_name_the_option() -> None:
    with pytest.raises(ValueError, match="form"):
        newton_schulz(torch.randn(4, 8), form="fast")
    with pytest.raises(ValueError, match="at least 2"):
        gram_newton_schulz(torch.randn(4))
    with pytest.raises(ValueError, match="steps"):
        gram_newton_schulz(torch.randn(4, 8), steps=0)


def test_polar_express_schedule_reproduces_the_paper() -> None:
    # The published coefficients (stored with the 1.01 safety factor in NS_PRESETS) come out of
    # the greedy minimax recurrence of Amsel et al., Algorithm 1, with lower bound 1e-3.
    ours = polar_express_schedule(8)
    published = NS_PRESETS["polar_express"].coefficients
    for t, ((a, b, c), (pa, pb, pc)) in enumerate(zip(ours, published, strict=True)):
        if t < len(ours) - 1:
            a, b, c = a / 1.01, b / 1.01**3, c / 1.01**5
        assert abs(a - pa) < 1e-9 and abs(b - pb) < 1e-9 and abs(c - pc) < 1e-9


def test_polar_express_schedule_properties() -> None:
    # A larger lower bound converges in fewer steps on inputs that respect it...
    sched = polar_express_schedule(4, lower=0.05)
    x = torch.linspace(0.05, 1.0, 200, dtype=torch.float64)
    for a, b, c in sched:
        x = a * x + b * x**3 + c * x**5
    assert (x - 1).abs().max() < 0.01
    # ...while the paper's 1e-3 schedule after 4 steps is still far from 1 at its lower end.
    y = torch.tensor([1e-3], dtype=torch.float64)
    for a, b, c in polar_express_schedule(4):
        y = a * y + b * y**3 + c * y**5
    assert float(y) < 0.6
    with pytest.raises(ValueError, match="lower"):
        polar_express_schedule(3, lower=1.5)
    with pytest.raises(ValueError, match="steps"):
        polar_express_schedule(0)
