"""Parity with oracles: torch.optim.Muon, torch.optim.AdamW, and a float64 Scion reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import gluon_optim as go
from conftest import TiedNet, TinyNet, lm_loss

SHAPES = {"square": (24, 24), "tall": (40, 12), "wide": (12, 40)}


def _matrix_problem(seed: int) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(*s, generator=gen) * 0.1) for s in SHAPES.values()]
    targets = [torch.randn(*s, generator=gen) for s in SHAPES.values()]
    return params, targets


def _grads(params: list[nn.Parameter], targets: list[torch.Tensor], step: int) -> None:
    # A non-quadratic loss whose gradient changes with the iterate, so any divergence between
    # the two optimizers would grow rather than wash out.
    for p in params:
        p.grad = None
    loss = sum(
        ((torch.tanh(p) - t * math.cos(step)) ** 2).sum()
        for p, t in zip(params, targets, strict=True)
    )
    loss.backward()


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_muon_preset_matches_torch_muon(nesterov: bool, weight_decay: float) -> None:
    ours, targets = _matrix_problem(1)
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    opt = go.muon(ours, lr=0.02, momentum=0.95, nesterov=nesterov, weight_decay=weight_decay)
    ref_opt = torch.optim.Muon(
        ref,
        lr=0.02,
        momentum=0.95,
        nesterov=nesterov,
        weight_decay=weight_decay,
        adjust_lr_fn="original",
    )
    for step in range(12):
        _grads(ours, targets, step)
        _grads(ref, targets, step)
        opt.step()
        ref_opt.step()
    for name, p, q in zip(SHAPES, ours, ref, strict=True):
        # Same operations in the same order: the iterates agree bit for bit.
        assert torch.equal(p, q), f"{name}: max |diff| {(p - q).abs().max().item():.3e}"
        buf, ref_buf = opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"]
        assert torch.equal(buf, ref_buf), f"{name}: momentum buffers differ"


@pytest.mark.parametrize(
    "rule,torch_rule", [("muon", "original"), ("moonlight", "match_rms_adamw")]
)
def test_muon_shape_rules_match_torch_adjust_lr(rule: str, torch_rule: str) -> None:
    ours, targets = _matrix_problem(2)
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    opt = go.muon(ours, lr=0.01, shape_rule=rule)
    ref_opt = torch.optim.Muon(ref, lr=0.01, weight_decay=0.0, adjust_lr_fn=torch_rule)
    for step in range(10):
        _grads(ours, targets, step)
        _grads(ref, targets, step)
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref, strict=True):
        assert torch.equal(p, q)


def test_muon_preset_adamw_part_matches_torch_adamw(tiny: TinyNet) -> None:
    ref_model = copy.deepcopy(tiny)
    opt = go.muon(
        tiny,
        lr=0.02,
        adamw_lr=3e-3,
        adamw_betas=(0.9, 0.99),
        adamw_eps=1e-8,
        adamw_weight_decay=0.05,
    )
    adam_names = {
        n for g in opt.param_groups if g["algorithm"] == "adamw" for n in g["param_names"]
    }
    muon_names = {n for n, _ in tiny.named_parameters()} - adam_names
    assert muon_names == {"fc.weight", "conv.weight"}
    ref_adam = torch.optim.AdamW(
        [p for n, p in ref_model.named_parameters() if n in adam_names],
        lr=3e-3,
        betas=(0.9, 0.99),
        eps=1e-8,
        weight_decay=0.05,
        foreach=False,
    )
    x = torch.randint(0, 23, (4, 9))
    for _ in range(8):
        # Both models see the gradient of the *same* (ours) parameters, so the AdamW parts can be
        # compared step by step while the Muon part only moves ours.
        opt.zero_grad()
        lm_loss(tiny, x).backward()
        grads = {n: p.grad.clone() for n, p in tiny.named_parameters()}
        for n, p in ref_model.named_parameters():
            p.grad = grads[n] if n in adam_names else None
        opt.step()
        ref_adam.step()
        ref_model.load_state_dict(
            {
                n: (v if n in adam_names else tiny.state_dict()[n])
                for n, v in ref_model.state_dict().items()
            }
        )
    ref_params = dict(ref_model.named_parameters())
    for n, p in tiny.named_parameters():
        if n in adam_names:
            assert torch.equal(p, ref_params[n]), n


# ---------------------------------------------------------------------------------------------
# Scion: a float64 reference written from Pethick et al. 2025, Algorithm 3, with the closed-form
# LMOs of their Tables 2-3 computed by SVD. It shares no code with the library.
# ---------------------------------------------------------------------------------------------


def _polar(g: torch.Tensor) -> torch.Tensor:
    # U V^T over the singular directions that carry gradient. Dead ReLU units give exactly zero
    # gradient rows; the LMO is then not unique, and the minimum-norm choice (the limit of
    # Newton–Schulz, which fixes 0) leaves those directions alone.
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    return (u * (s > 1e-12 * s.max())) @ vh


def _reference_lmo(role: str, g: torch.Tensor) -> torch.Tensor:
    if role in ("hidden",):
        return -math.sqrt(g.shape[0] / g.shape[1]) * _polar(g)
    if role == "conv":
        c_out, c_in, k = g.shape[0], g.shape[1], math.prod(g.shape[2:])
        return (-(math.sqrt(c_out / c_in) / k) * _polar(g.reshape(c_out, -1))).reshape(g.shape)
    if role == "embedding":  # (vocab, dim): each token's vector to RMS 1; unseen tokens stay
        norms = g.norm(dim=1, keepdim=True)
        return torch.where(norms > 0, -math.sqrt(g.shape[1]) * g / norms, torch.zeros_like(g))
    if role in ("head", "tied"):  # (d_out, d_in): sign scaled by 1/fan-in
        return -torch.sign(g) / g.shape[1]
    if role in ("bias", "norm"):
        return -math.sqrt(g.numel()) * g / g.norm()
    raise AssertionError(role)


def _scion_reference(
    model: nn.Module,
    roles: dict[str, str],
    batches: list[torch.Tensor],
    *,
    lr: float,
    alpha: float,
    scales: dict[str, float],
    constrained: bool,
) -> None:
    params = dict(model.named_parameters())
    d = {n: torch.zeros_like(p) for n, p in params.items()}
    for x in batches:
        model.zero_grad()
        lm_loss(model, x).backward()
        with torch.no_grad():
            for n, p in params.items():
                d[n] = alpha * p.grad + (1 - alpha) * d[n]
                step = lr * scales[roles[n]] * _reference_lmo(roles[n], d[n])
                p.copy_(((1 - lr) * p if constrained else p) + step)


@pytest.mark.parametrize("constrained", [False, True])
@pytest.mark.parametrize("model_cls", [TinyNet, TiedNet])
def test_scion_matches_float64_reference(constrained: bool, model_cls: type[nn.Module]) -> None:
    model = model_cls().double()
    ref_model = copy.deepcopy(model)
    scales = {
        "embedding": 20.0,
        "tied": 300.0,
        "hidden": 30.0,
        "conv": 40.0,
        "head": 500.0,
        "bias": 5.0,
        "norm": 7.0,
    }
    lr = 0.01
    opt = go.scion(
        model,
        lr=lr,
        momentum=0.9,
        constrained=constrained,
        scales=scales,
        polar_method="svd",
        compute_dtype="float64",
    )
    roles = {a.name: a.role for a in go.assign_roles(model)}
    assert ("tied" in roles.values()) == (model_cls is TiedNet)
    batches = [torch.randint(0, 19, (3, 8)) for _ in range(10)]
    for x in batches:
        opt.zero_grad()
        lm_loss(model, x).backward()
        opt.step()
    _scion_reference(
        ref_model, roles, batches, lr=lr, alpha=0.1, scales=scales, constrained=constrained
    )
    ref = dict(ref_model.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, ref[n], rtol=1e-9, atol=1e-11, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize(
    ("preset", "steps", "dtype", "bound"),
    # Real gradients have a wide singular spectrum, so Jordan's quintic (which leaves small
    # singular values small) is further from U V^T here than on Gaussian matrices.
    [("jordan", 5, "bfloat16", 0.6), ("polar_express", 10, "float32", 0.05)],
)
def test_scion_newton_schulz_step_is_close_to_reference_step(
    preset: str, steps: int, dtype: str, bound: float
) -> None:
    # From the same state, one Newton–Schulz step must agree exactly with the exact-SVD reference
    # on the non-spectral roles, and within the orthogonalisation error on the spectral ones.
    model = TinyNet().double()
    ref_model = copy.deepcopy(model)
    opt = go.unscion(model, lr=0.002, ns_preset=preset, ns_steps=steps, compute_dtype=dtype)
    roles = {a.name: a.role for a in go.assign_roles(model)}
    x = torch.randint(0, 23, (3, 8))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    lm_loss(model, x).backward()
    opt.step()
    _scion_reference(
        ref_model,
        roles,
        [x],
        lr=0.002,
        alpha=0.1,
        scales=go.presets.SCION_SCALES,
        constrained=False,
    )
    ref = dict(ref_model.named_parameters())
    for n, p in model.named_parameters():
        ours, exact = p - start[n], ref[n] - start[n]
        rel = ((ours - exact).norm() / exact.norm()).item()
        tol = bound if roles[n] in ("hidden", "conv") else 1e-12
        assert rel <= tol, f"{n} ({roles[n]}): relative step difference {rel:.3g}"
