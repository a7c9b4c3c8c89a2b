"""Properties of every norm: sign convention, unit ball, scale invariance, closed-form duals."""

from __future__ import annotations

import math

import pytest
import torch

from gluon_optim import norms
from gluon_optim.norms import NORMS, SHAPE_RULES, shape_factor

MATRIX_SHAPES = [(7, 7), (5, 11), (11, 5), (1, 9), (9, 1), (3, 4, 6)]  # last: a batch of 3
CONV_SHAPES = [(6, 4, 3, 3), (4, 6, 3), (8, 3, 1, 5)]
VECTOR_SHAPES = [(1,), (13,), (4, 7)]  # last: a batch of 4 vectors


def _make(name: str) -> norms.Norm:
    # Exact SVD in float64 for the spectral norms: the properties are then exact identities.
    if name in ("spectral", "spectral_conv"):
        return norms.get(name, method="svd", compute_dtype="float64")
    return norms.get(name)


def _cases() -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for name, cls in NORMS.items():
        shapes = {
            "matrix": MATRIX_SHAPES,
            "conv": CONV_SHAPES,
            "vector": VECTOR_SHAPES,
            "tensor": MATRIX_SHAPES + VECTOR_SHAPES + CONV_SHAPES,
        }[cls.kind]
        out += [(name, s) for s in shapes]
    return out


def _layer_dims(norm: norms.Norm, g: torch.Tensor) -> int:
    return {"matrix": 2, "vector": 1}.get(norm.kind, g.ndim)


def _inner(norm: norms.Norm, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=tuple(range(-_layer_dims(norm, a), 0)))


@pytest.mark.parametrize(("name", "shape"), _cases())
def test_lmo_properties(name: str, shape: tuple[int, ...]) -> None:
    norm = _make(name)
    g = torch.randn(*shape, dtype=torch.float64)
    before = g.clone()
    d = norm.lmo(g)
    assert d.shape == g.shape and d.dtype == g.dtype
    assert torch.equal(g, before), "lmo modified its input"
    dual = norm.dual(g)
    # <g, lmo(g)> = -||g||_*
    torch.testing.assert_close(_inner(norm, g, d), -dual, rtol=1e-10, atol=1e-12)
    # lmo(g) is on the unit sphere of the primal norm
    torch.testing.assert_close(norm.norm(d), torch.ones_like(dual), rtol=1e-10, atol=1e-12)
    # positive scale invariance
    torch.testing.assert_close(norm.lmo(3.7 * g), d, rtol=1e-10, atol=1e-12)
    # the dual norm is the support function of the unit ball: <g, a> <= ||g||_* ||a||
    a = torch.randn(*shape, dtype=torch.float64)
    assert torch.all(_inner(norm, g, a) <= dual * norm.norm(a) * (1 + 1e-10))


@pytest.mark.parametrize(("name", "shape"), _cases())
def test_zero_gradient_gives_zero_step(name: str, shape: tuple[int, ...]) -> None:
    for norm in (_make(name), norms.get(name)):
        out = norm.lmo(torch.zeros(*shape))
        assert torch.equal(out, torch.zeros(*shape)), f"{norm.describe()} on zeros"
        assert torch.all(norm.dual(torch.zeros(*shape)) == 0)


def _nuc(g: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(g, ord="nuc")


def test_dual_closed_forms() -> None:
    g = torch.randn(6, 10, dtype=torch.float64)
    d_out, d_in = g.shape
    expected = {
        "spectral": math.sqrt(d_out / d_in) * _nuc(g),
        "colnorm": math.sqrt(d_out) * g.norm(dim=0).sum(),
        "rownorm": g.norm(dim=1).sum() / math.sqrt(d_in),
        "sign": g.abs().sum() / d_in,
        "sign_unscaled": g.abs().sum(),
        "euclidean": g.norm(),
    }
    for name, value in expected.items():
        torch.testing.assert_close(_make(name).dual(g), value, rtol=1e-12, atol=0)
    k = torch.randn(8, 3, 3, 3, dtype=torch.float64)
    conv = math.sqrt(8 / 3) / 9 * _nuc(k.reshape(8, -1))
    torch.testing.assert_close(_make("spectral_conv").dual(k), conv, rtol=1e-12, atol=0)
    b = torch.randn(17, dtype=torch.float64)
    torch.testing.assert_close(_make("bias_rms").dual(b), math.sqrt(17) * b.norm())


def test_lmo_closed_forms() -> None:
    g = torch.randn(6, 10, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    torch.testing.assert_close(_make("spectral").lmo(g), -math.sqrt(6 / 10) * u @ vh)
    torch.testing.assert_close(_make("sign").lmo(g), -torch.sign(g) / 10)
    torch.testing.assert_close(_make("colnorm").lmo(g), -math.sqrt(6) * g / g.norm(dim=0))
    torch.testing.assert_close(
        _make("rownorm").lmo(g), -g / (math.sqrt(10) * g.norm(dim=1, keepdim=True))
    )
    b = torch.randn(5, dtype=torch.float64)
    torch.testing.assert_close(_make("bias_rms").lmo(b), -math.sqrt(5) * b / b.norm())


def test_primal_closed_forms() -> None:
    a = torch.randn(6, 10, dtype=torch.float64)
    torch.testing.assert_close(
        _make("spectral").norm(a), math.sqrt(10 / 6) * torch.linalg.matrix_norm(a, 2)
    )
    torch.testing.assert_close(_make("sign").norm(a), 10 * a.abs().max())
    torch.testing.assert_close(_make("colnorm").norm(a), a.norm(dim=0).max() / math.sqrt(6))
    torch.testing.assert_close(_make("rownorm").norm(a), math.sqrt(10) * a.norm(dim=1).max())


def test_shape_rules() -> None:
    assert set(SHAPE_RULES) == {"rms", "muon", "moonlight", "none"}
    assert shape_factor("rms", 8, 2) == 2.0 and shape_factor("rms", 2, 8) == 0.5
    assert shape_factor("muon", 8, 2) == 2.0 and shape_factor("muon", 2, 8) == 1.0
    assert shape_factor("moonlight", 2, 8) == pytest.approx(0.2 * math.sqrt(8))
    assert shape_factor("none", 3, 5) == 1.0
    # Shape rules read the flattened 2-D shape: a (4, 2, 3, 3) kernel is a 4 x 18 matrix.
    spec = norms.get("spectral", shape_rule="rms", method="svd", compute_dtype="float64")
    k = torch.randn(4, 18, dtype=torch.float64)
    assert spec.lmo(k).norm().item() == pytest.approx(math.sqrt(4 / 18) * 2.0)  # rank 4


@pytest.mark.parametrize("rule", sorted(SHAPE_RULES))
def test_spectral_scaling_rule(rule: str) -> None:
    g = torch.randn(9, 4, dtype=torch.float64)
    base = norms.get("spectral", shape_rule="none", method="svd", compute_dtype="float64")
    scaled = norms.get("spectral", shape_rule=rule, method="svd", compute_dtype="float64")
    c = shape_factor(rule, 9, 4)
    torch.testing.assert_close(scaled.lmo(g), c * base.lmo(g))
    torch.testing.assert_close(scaled.dual(g), c * base.dual(g))
    torch.testing.assert_close(scaled.norm(g), base.norm(g) / c)


def test_newton_schulz_lmo_is_close_to_exact() -> None:
    g = torch.randn(32, 16)
    exact = norms.get("spectral", method="svd").lmo(g)
    for preset, bound in (("jordan", 0.35), ("polar_express", 0.13)):
        approx = norms.get("spectral", ns_preset=preset).lmo(g)
        assert approx.dtype == torch.float32
        assert ((approx - exact).norm() / exact.norm()) < bound


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="Unknown norm 'spectal'"):
        norms.get("spectal")
    with pytest.raises(ValueError, match="does not take option"):
        norms.get("sign", shape_rule="rms")
    with pytest.raises(ValueError, match="Unknown shape_rule 'wide'"):
        norms.get("spectral", shape_rule="wide")
    with pytest.raises(ValueError, match="Unknown ns_preset"):
        norms.get("spectral", ns_preset="fast")
    with pytest.raises(ValueError, match="Invalid ns_steps"):
        norms.get("spectral", ns_steps=0)
    with pytest.raises(ValueError, match="needs a matrix"):
        norms.get("spectral").lmo(torch.ones(5))
    with pytest.raises(ValueError, match="needs a conv kernel"):
        norms.get("spectral_conv").lmo(torch.ones(5, 4))
    with pytest.raises(ValueError, match="empty tensor"):
        norms.get("euclidean").lmo(torch.ones(0, 3))
