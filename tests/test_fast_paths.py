"""The optimizer's fast paths against its reference loop.

* ``foreach=True`` (multi-tensor momentum, same-shape LMOs stacked into one batched call) must
  give the iterates of the per-parameter loop: to 1e-12 with a float64 compute dtype, and within
  bfloat16 round-off of a batched matrix product with the default one.
* ``ns_form="gram"``/``"auto"`` must give the standard form's iterates to 1e-10 in float64.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import gluon_optim as go
from conftest import lm_loss


class RepeatNet(nn.Module):
    """Blocks of repeated shapes (what the batched path stacks), plus every elementwise role."""

    def __init__(self, vocab: int = 17, dim: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "attn": nn.Linear(dim, dim, bias=False),
                    "up": nn.Linear(dim, 3 * dim),
                    "down": nn.Linear(3 * dim, dim, bias=False),
                    "ln": nn.LayerNorm(dim),
                }
            )
            for _ in range(depth)
        )
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embedding(x)
        for b in self.blocks:
            h = b["ln"](h + b["attn"](h))
            h = h + b["down"](torch.relu(b["up"](h)))
        return self.head(h)


def _train(make: Callable[[nn.Module], torch.optim.Optimizer], steps: int = 4) -> nn.Module:
    torch.manual_seed(0)
    model = RepeatNet()
    opt = make(model)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, 17, (4, 9), generator=gen)
        opt.zero_grad()
        lm_loss(model, x).backward()
        opt.step()
    return model


@torch.no_grad()
def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(
        float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


MAKERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "muon": lambda m, **kw: go.muon(m, lr=0.02, adamw_lr=1e-2, **kw),
    "scion": lambda m, **kw: go.scion(m, lr=1e-3, **kw),
    "unscion-l0l1": lambda m, **kw: go.unscion(m, lr=1.0, radius_policy="l0l1", l1=50.0, **kw),
    "gluon-momentum-l0l1": lambda m, **kw: go.gluon(
        m, lr=1.0, radius_policy="l0l1", l1=50.0, radius_source="momentum", weight_decay=0.1, **kw
    ),
    "gluon-no-momentum": lambda m, **kw: go.gluon(m, lr=0.01, momentum=0.0, **kw),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_foreach_equals_loop_in_float64(name: str) -> None:
    make = MAKERS[name]
    loop = _train(lambda m: make(m, foreach=False, compute_dtype="float64"))
    batched = _train(lambda m: make(m, foreach=True, compute_dtype="float64"))
    assert _max_diff(loop, batched) < 1e-12


@pytest.mark.parametrize(
    "make",
    [
        lambda m, **kw: go.gluon(m, lr=0.05, radius_policy="theory_decay", **kw),
        lambda m, **kw: go.gluon(
            m, lr=0.02, estimator="mvr1", two_point="approx", allow_degenerate=True, **kw
        ),
    ],
    ids=["theory_decay", "mvr1-approx"],
)
def test_foreach_falls_back_to_the_loop(make: Callable[..., torch.optim.Optimizer]) -> None:
    # A step-dependent momentum or a variance-reduced estimator takes the per-parameter loop
    # whatever foreach says, so the two settings give the same bits.
    loop = _train(lambda m: make(m, foreach=False))
    batched = _train(lambda m: make(m, foreach=True))
    assert _max_diff(loop, batched) == 0.0


@pytest.mark.parametrize("name", ["muon", "scion"])
def test_foreach_within_bf16_roundoff(name: str) -> None:
    # A stacked bf16 product may round differently from one matrix at a time; the iterates stay
    # within a few bf16 ulps of the update size (lr 0.02 / 1e-3 times a unit-size direction).
    make = MAKERS[name]
    loop = _train(lambda m: make(m, foreach=False))
    batched = _train(lambda m: make(m, foreach=True))
    assert _max_diff(loop, batched) < 0.05 * (0.02 if name == "muon" else 1e-3 * 50)


@pytest.mark.parametrize("name", ["muon", "scion"])
def test_foreach_keeps_state_dict_and_resume(name: str) -> None:
    # The batched path writes the same state keys: a checkpoint taken under one path resumes
    # under the other with identical results.
    make = MAKERS[name]
    torch.manual_seed(0)
    model = RepeatNet()
    opt = make(model, foreach=True, compute_dtype="float64")
    x = torch.randint(0, 17, (4, 9))
    lm_loss(model, x).backward()
    opt.step()
    ref_model = RepeatNet()
    ref_model.load_state_dict(model.state_dict())
    ref = make(ref_model, foreach=False, compute_dtype="float64")
    # deepcopy: load_state_dict keeps tensors that need no cast, so the two would share buffers.
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    # The group setting travels with the checkpoint; switch the copy to the reference loop.
    assert any(g["foreach"] for g in ref.param_groups)
    for group in ref.param_groups:
        group["foreach"] = False
    for m, o in ((model, opt), (ref_model, ref)):
        o.zero_grad()
        lm_loss(m, x).backward()
        o.step()
    assert _max_diff(model, ref_model) < 1e-12
    assert sorted(opt.state_dict()["state"][0]) == sorted(ref.state_dict()["state"][0])


def test_foreach_default_is_off_on_cpu_and_grads_untouched() -> None:
    torch.manual_seed(0)
    model = RepeatNet()
    opt = go.muon(model, lr=0.02)
    assert all(g["foreach"] is None for g in opt.param_groups)
    lm_loss(model, torch.randint(0, 17, (2, 5))).backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    opt2 = go.muon(model, lr=0.02, foreach=True)
    opt2.step()
    after = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.equal(a, b) for a, b in zip(grads, after, strict=True))


@pytest.mark.parametrize("preset", ["jordan", "polar_express"])
def test_ns_form_gram_equals_standard_in_float64(preset: str) -> None:
    def make(form: str) -> Callable[[nn.Module], torch.optim.Optimizer]:
        return lambda m: go.muon(
            m, lr=0.02, adamw_lr=1e-2, ns_preset=preset, ns_form=form, compute_dtype="float64"
        )

    standard = _train(make("standard"))
    for form in ("gram", "auto"):
        assert _max_diff(standard, _train(make(form))) < 1e-10


def test_fast_muon_recipe_descends_like_the_reference() -> None:
    # The benchmark's fast configuration (Polar Express, Gram where it pays, bf16) trains the
    # model as well as the default Jordan/standard one over a few steps.
    def loss_after(**kw: object) -> float:
        model = _train(lambda m: go.muon(m, lr=0.02, adamw_lr=1e-2, **kw), steps=8)
        x = torch.randint(0, 17, (8, 9), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            return float(lm_loss(model, x))

    reference = loss_after()
    fast = loss_after(ns_preset="polar_express", ns_form="auto", foreach=True)
    assert abs(fast - reference) < 0.05 * reference


def test_bad_fast_path_options_name_the_key_and_change_nothing() -> None:
    model = RepeatNet()
    with pytest.raises(ValueError, match="ns_form"):
        go.muon(model, ns_form="fast")
    with pytest.raises(ValueError, match="foreach"):
        go.muon(model, foreach="yes")
    opt = go.muon(model, lr=0.02)
    before = [dict(g) for g in opt.param_groups]
    opt.param_groups[0]["ns_form"] = "quick"
    lm_loss(model, torch.randint(0, 17, (2, 5))).backward()
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="ns_form"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters(), strict=True))
    assert not opt.state
    assert before[1] == opt.param_groups[1]


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_newton_schulz_matches_and_lr_changes_do_not_recompile(backend: str) -> None:
    # Inductor needs a C++ compiler and takes seconds per shape, so the suite traces with the
    # cheap backends; `gluon-optim bench --compile` measures inductor.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    kw = dict(ns_preset="polar_express", ns_form="auto", compute_dtype="float64")
    eager = _train(lambda m: go.muon(m, lr=0.02, adamw_lr=1e-2, **kw))
    compiled_model = RepeatNet()
    opt = go.muon(compiled_model, lr=0.02, adamw_lr=1e-2, compile=backend, **kw)
    graphs = None
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    compiled_model.load_state_dict(RepeatNet().state_dict())
    for step in range(4):
        x = torch.randint(0, 17, (4, 9), generator=gen)
        opt.zero_grad()
        lm_loss(compiled_model, x).backward()
        opt.step()
        if step == 0:
            graphs = counters["stats"]["unique_graphs"]
        for group in opt.param_groups:  # a scheduler's change: must not recompile
            group["lr"] = group["lr"] * 0.5 if step < 3 else group["lr"]
    # RepeatNet's hidden matrices have 3 shapes: one graph each, compiled on the first step.
    assert graphs == 3
    assert counters["stats"]["unique_graphs"] == graphs
    ref = _train(
        lambda m: _halving(go.muon(m, lr=0.02, adamw_lr=1e-2, **kw)),
    )
    assert _max_diff(ref, compiled_model) < 1e-10
    assert _max_diff(eager, ref) > 0  # the lr changes did change the run


def _halving(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Halve every group's lr after each of the first three steps, as the compile test does."""
    calls = {"n": 0}
    step = opt.step

    def stepped(closure: object = None) -> object:
        out = step()
        if calls["n"] < 3:
            for group in opt.param_groups:
                group["lr"] *= 0.5
        calls["n"] += 1
        return out

    opt.step = stepped  # type: ignore[method-assign]
    return opt


def test_compile_handles_more_matrix_shapes_than_dynamos_default_limit() -> None:
    # Dynamo allows 8 specialisations per function by default; a ResNet has more distinct
    # kernel shapes than that, and used to fail with FailOnRecompileLimitHit.
    torch._dynamo.reset()
    ps = [nn.Parameter(torch.randn(4 + i, 5)) for i in range(12)]
    qs = [nn.Parameter(p.detach().clone()) for p in ps]
    compiled, plain = go.Gluon(ps, lr=0.01, compile="eager"), go.Gluon(qs, lr=0.01)
    for p, q in zip(ps, qs, strict=True):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    compiled.step()
    plain.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs, strict=True))


def test_compile_option_is_validated() -> None:
    with pytest.raises(ValueError, match="compile"):
        go.muon(RepeatNet(), compile="tensorrt")
    with pytest.raises(ValueError, match="backend"):
        go.polar.compiled_newton_schulz("nope")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_groups_batch_by_default_and_match_the_cpu_loop() -> None:
    from gluon_optim.optimizer import _use_foreach

    kw = dict(ns_preset="polar_express", ns_form="auto", compute_dtype="float64")
    cpu = _train(lambda m: go.muon(m, lr=0.02, adamw_lr=1e-2, foreach=False, **kw))
    torch.manual_seed(0)
    model = RepeatNet().cuda()
    opt = go.muon(model, lr=0.02, adamw_lr=1e-2, **kw)
    lmo = [g for g in opt.param_groups if g["algorithm"] == "lmo"]
    assert all(_use_foreach(g, [(p, p) for p in g["params"]]) for g in lmo)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randint(0, 17, (4, 9), generator=gen).cuda()
        opt.zero_grad()
        lm_loss(model, x).backward()
        opt.step()
    assert _max_diff(cpu, model.cpu()) < 1e-6
