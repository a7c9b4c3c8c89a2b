"""Newton–Schulz against the exact SVD polar factor, and against torch.optim.Muon's kernel."""

from __future__ import annotations

import pytest
import torch

from gluon_optim.polar import NS_PRESETS, newton_schulz, polar, polar_svd, relative_error

SHAPES = [(32, 32), (16, 48), (48, 16), (1, 20), (20, 1), (64, 128)]

# Relative Frobenius error of 5 bfloat16 steps against U V^T on Gaussian matrices, as measured by
# benchmarks/accuracy.py (jordan 0.14-0.22, and 0.32 for a single row or column whose one
# singular value Jordan maps to 0.68; polar_express 0.085-0.11 on these shapes); the
# bounds leave headroom for other seeds. Jordan's quintic does not converge: by design it leaves
# singular values in about [0.7, 1.2]. Polar Express is minimax-optimal for singular values in
# [1e-3, 1] and reaches ~0.007 with 8 steps.
NS_BOUNDS = {"jordan": 0.35, "polar_express": 0.13}


def _gaussian(shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype)


def test_svd_polar_is_orthogonal_and_matches_definition() -> None:
    g = _gaussian((12, 7))
    q = polar_svd(g)
    assert torch.allclose(q.T @ q, torch.eye(7, dtype=torch.float64), atol=1e-12)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert torch.allclose(q, u @ vh, atol=1e-12)


def test_svd_polar_drops_null_directions() -> None:
    a, b = _gaussian((10, 3)), _gaussian((3, 8))
    q = polar_svd(a @ b)  # rank 3
    assert torch.linalg.matrix_rank(q) == 3
    s = torch.linalg.svdvals(q)
    assert torch.allclose(s[:3], torch.ones(3, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("preset", sorted(NS_BOUNDS))
@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_close_to_svd(preset: str, shape: tuple[int, int]) -> None:
    g = _gaussian(shape, torch.float32)
    err = relative_error(newton_schulz(g, preset=preset, steps=5), polar_svd(g.double()))
    assert err < NS_BOUNDS[preset], f"{preset} {shape}: relative error {err:.3f}"


def test_polar_express_converges_in_float64() -> None:
    g = _gaussian((40, 24))
    err = relative_error(
        newton_schulz(g, preset="polar_express", steps=12, dtype=None), polar_svd(g)
    )
    assert err < 1e-6


@pytest.mark.parametrize("shape", [(32, 32), (16, 48), (48, 16), (3, 200)])
def test_jordan_bf16_is_bitwise_torch_muon(shape: tuple[int, int]) -> None:
    # torch.optim.Muon is new in torch 2.9: older releases (still supported) have no peer here.
    muon = pytest.importorskip("torch.optim._muon", reason="torch.optim.Muon is new in torch 2.9")
    _zeropower_via_newtonschulz = muon._zeropower_via_newtonschulz
    g = _gaussian(shape, torch.float32)
    ours = newton_schulz(g, preset="jordan", steps=5)
    ref = _zeropower_via_newtonschulz(g, (3.4445, -4.7750, 2.0315), 5, 1e-7)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("preset", sorted(NS_PRESETS))
def test_zero_in_zero_out(preset: str) -> None:
    for fn in (lambda z: newton_schulz(z, preset=preset), polar_svd):
        out = fn(torch.zeros(6, 4))
        assert torch.equal(out.float(), torch.zeros(6, 4))


def test_does_not_touch_input_even_when_dtypes_match() -> None:
    # torch.optim.Muon's kernel divides in place after `.bfloat16()`, which aliases a bf16 input.
    g = _gaussian((8, 5), torch.float32).bfloat16()
    before = g.clone()
    newton_schulz(g, preset="jordan")
    newton_schulz(g.float(), dtype=None)
    assert torch.equal(g, before)


@pytest.mark.parametrize("preset", ["jordan", "polar_express"])
def test_batched_equals_loop(preset: str) -> None:
    g = _gaussian((3, 2, 10, 6), torch.float32)
    batched = newton_schulz(g, preset=preset, dtype=torch.float32)
    for i in range(3):
        for j in range(2):
            single = newton_schulz(g[i, j], preset=preset, dtype=torch.float32)
            torch.testing.assert_close(batched[i, j], single, atol=1e-5, rtol=1e-5)
    svd = polar_svd(g)
    torch.testing.assert_close(svd[1, 0], polar_svd(g[1, 0]), atol=1e-6, rtol=1e-6)


def test_polar_dispatch_and_errors() -> None:
    g = _gaussian((5, 4), torch.float32)
    torch.testing.assert_close(polar(g, method="svd"), polar_svd(g))
    with pytest.raises(ValueError, match="unknown method 'qr'"):
        polar(g, method="qr")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        newton_schulz(torch.ones(3))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        newton_schulz(g, steps=0)


def test_a_large_cpu_batch_runs_in_chunks_with_the_same_matrices() -> None:
    """A CPU batch over polar.CPU_BATCH_BYTES goes through Newton–Schulz in chunks (the whole
    batch left the caches, docs/performance.md): same shape out, each matrix as when alone."""
    from gluon_optim import polar as P

    x = torch.randn(3, 100, 64, 64, generator=torch.Generator().manual_seed(0))
    per = 64 * 64 * 2  # bfloat16 bytes of one matrix
    assert P._cpu_chunk(x, torch.bfloat16) == P.CPU_BATCH_BYTES // per < 300
    assert P._cpu_chunk(x[:1, :10], torch.bfloat16) is None  # small: one call
    out = P.newton_schulz(x, dtype=torch.bfloat16)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    for idx in [(0, 0), (1, 57), (2, 99)]:
        alone = P.newton_schulz(x[idx], dtype=torch.bfloat16)
        assert (out[idx].float() - alone.float()).abs().max().item() < 2e-2, idx
