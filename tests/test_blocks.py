"""Blocks: a stack of experts or a fused matrix is several LMO units (gluon_optim.blocks).

The oracles: a blocked parameter must step as its units would if each were a parameter of its
own (float64, every radius policy), and each expert as torch.optim.Muon steps that expert's
matrix in its true orientation.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gluon_optim as go
from gluon_optim import blocks as B

# (stored shape, transposed, blocks): the layouts of the transformers experts classes and of
# fused matrices.
LAYOUTS = [
    ((3, 12, 8), False, "experts"),  # Mixtral / Qwen3-MoE / DeepSeek-V3: (E, d_out, d_in)
    ((3, 8, 12), True, "experts"),  # GPT-OSS: (E, d_in, d_out)
    ((3, 12, 8), False, "experts+chunks=2"),  # [gate; up] of each expert
    ((3, 8, 12), True, "experts+interleaved=2"),  # GPT-OSS's interleaved gate / up
    ((2, 2, 12, 8), False, "experts"),  # two leading dims
    ((18, 8), False, "chunks=3"),  # a [q; k; v] with equal sizes
    ((8, 18), True, "chunks=3"),  # GPT-2's Conv1D c_attn, stored (d, 3d)
    ((16, 8), False, "interleaved=4"),
]


def _units(t: torch.Tensor, transposed: bool, blocks: str) -> torch.Tensor:
    """The units of ``t`` as a flat batch, built by indexing (not by the library's view)."""
    m = t.mT if transposed else t
    b = B.parse(blocks)
    mats = m.reshape(-1, *m.shape[-2:]) if b.experts else m.unsqueeze(0)
    k = b.count
    if k == 1:
        return mats
    rows = mats.shape[-2] // k
    picks = [
        torch.arange(j, mats.shape[-2], k)
        if b.interleaved
        else torch.arange(j * rows, (j + 1) * rows)
        for j in range(k)
    ]
    return torch.stack([mats[:, idx] for idx in picks], 1).reshape(-1, rows, mats.shape[-1])


@pytest.mark.parametrize("shape,transposed,blocks", LAYOUTS)
def test_the_view_is_the_units_and_writes_through(
    shape: tuple[int, ...], transposed: bool, blocks: str
) -> None:
    t = torch.randn(shape)
    view = B.parse(blocks).view(t, transposed)
    assert tuple(view.shape) == B.parse(blocks).shape(shape, transposed)
    assert torch.equal(view.reshape(-1, *view.shape[-2:]), _units(t, transposed, blocks))
    assert view.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()  # a view
    norm = go.norms.get("spectral")
    back = norm.restore(norm.operand(t, transposed, blocks), t, transposed, blocks)
    assert torch.equal(back, t)
    assert B.units(shape, transposed, blocks) == view.shape[:-2].numel()


def _loss(ps: list[torch.Tensor], targets: list[torch.Tensor], step: int) -> torch.Tensor:
    return sum(
        ((torch.tanh(p) - t * math.cos(step)) ** 2).sum() for p, t in zip(ps, targets, strict=True)
    )


POLICIES = [
    {"radius_policy": "constant"},
    {"radius_policy": "l0l1", "l0": 0.5, "l1": 2.0},
    {"radius_policy": "l0l1", "l0": 0.5, "l1": 2.0, "radius_source": "momentum"},
]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: "-".join(map(str, p.values())))
@pytest.mark.parametrize("shape,transposed,blocks", LAYOUTS)
def test_a_blocked_parameter_steps_as_its_units_would_alone(
    shape: tuple[int, ...], transposed: bool, blocks: str, policy: dict[str, object]
) -> None:
    """Every unit gets its own LMO, shape factor, dual norm and radius (float64 throughout)."""
    gen = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64) * 0.3)
    target = torch.randn(shape, generator=gen, dtype=torch.float64)
    alone = [nn.Parameter(u.clone()) for u in _units(w.detach(), transposed, blocks)]
    alone_targets = list(_units(target, transposed, blocks))
    settings = dict(
        lr=0.05,
        momentum=0.9,
        weight_decay=0.1,
        compute_dtype="float64",
        shape_rule="rms",
        estimator="mvr2",
        **policy,
    )
    opt = go.Gluon([{"params": [w], "transposed": transposed, "blocks": blocks, **settings}])
    ref = go.Gluon([{"params": alone, **settings}])
    for step in range(6):
        for o, ps, ts in ((opt, [w], [target]), (ref, alone, alone_targets)):

            def closure(ps=ps, ts=ts, o=o, step=step) -> torch.Tensor:
                o.zero_grad()
                loss = _loss(ps, ts, step)
                loss.backward()
                return loss

            o.step(closure)
    got = _units(w.detach(), transposed, blocks)
    for u, (a, b) in enumerate(zip(got, alone, strict=True)):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), (u, (a - b).abs().max().item())


@pytest.mark.parametrize("shape,transposed,blocks", LAYOUTS[:4])
def test_every_expert_steps_as_torch_muon_on_its_matrix(
    shape: tuple[int, ...], transposed: bool, blocks: str
) -> None:
    """``go.muon`` on a stack against ``torch.optim.Muon`` on each unit in (d_out, d_in).

    Both run Newton–Schulz in bfloat16 with the same coefficients. On this CPU the batched
    bfloat16 matmul of some shapes rounds differently from one matrix alone (measured: the
    (6, 8) units of a (3, 2, 6, 8) batch), so the bound is a few bfloat16 ulps of one update
    (lr * factor * |D|, |D| <= 1), not bit equality; the unbatched shapes agree exactly.
    """
    gen = torch.Generator().manual_seed(1)
    w = nn.Parameter(torch.randn(shape, generator=gen) * 0.1)
    target = torch.randn(shape, generator=gen)
    ref = [nn.Parameter(u.clone()) for u in _units(w.detach(), transposed, blocks)]
    lr = 0.02
    opt = go.muon([w], lr=lr, momentum=0.95, weight_decay=0.1, blocks=blocks, transposed=transposed)
    ref_opt = torch.optim.Muon(ref, lr=lr, momentum=0.95, weight_decay=0.1, adjust_lr_fn="original")
    for step in range(4):
        w.grad = None
        _loss([w], [target], step).backward()
        assert w.grad is not None
        for r, g in zip(ref, _units(w.grad, transposed, blocks), strict=True):
            r.grad = g.clone()
        opt.step()
        ref_opt.step()
    got = _units(w.detach(), transposed, blocks)
    factor = math.sqrt(max(1.0, got.shape[-2] / got.shape[-1]))
    for u, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert (a - b).abs().max().item() <= 4 * lr * factor * 2**-8, u
    if B.parse(blocks).count == 1:
        assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))


def test_describe_names_the_blocks_and_the_units_factor() -> None:
    w = nn.Parameter(torch.zeros(4, 96, 32))
    opt = go.muon([("experts.gate_up_proj", w)], blocks="experts+chunks=2")
    row = next(line for line in go.describe(opt).splitlines() if "gate_up_proj" in line)
    assert "[experts+chunks=2: 8 units]" in row
    assert f"{math.sqrt(48 / 32):.4g}" in row  # each unit is (48, 32)


def test_the_setting_round_trips_through_a_weights_only_state() -> None:
    import io

    w = nn.Parameter(torch.randn(2, 6, 4))
    opt = go.muon([w], blocks="experts+interleaved=2")
    w.grad = torch.randn_like(w)
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    twin = go.muon([nn.Parameter(w.detach().clone())])
    twin.load_state_dict(torch.load(buf, weights_only=True))
    assert twin.param_groups[0]["blocks"] == "experts+interleaved=2"


@pytest.mark.parametrize(
    "value,message",
    [
        ("expert", "'expert' is not 'experts', 'chunks=K' or 'interleaved=K'"),
        ("chunks=1", "K must be 2 or more"),
        ("chunks=2+interleaved=2", "at most one of chunks=K and interleaved=K"),
        ("experts+experts", "a part is repeated"),
        (3, "expected text"),
    ],
)
def test_a_malformed_setting_is_refused_with_its_name(value: object, message: str) -> None:
    w = nn.Parameter(torch.zeros(2, 6, 4))
    with pytest.raises(ValueError, match="blocks") as err:
        go.Gluon([{"params": [w], "blocks": value}])
    assert message in str(err.value)


@pytest.mark.parametrize(
    "shape,group,message",
    [
        ((6, 4), {"blocks": "experts"}, "needs a stack of matrices"),
        ((2, 6, 4), {"blocks": "chunks=2"}, "a stack of experts is 'experts+chunks=2'"),
        ((7, 4), {"blocks": "chunks=2"}, "d_out = 7"),
        ((2, 6, 4), {"blocks": "experts", "norm": "spectral_conv"}, "needs a matrix norm"),
        ((2, 6, 4), {"blocks": "experts", "norm": "bias_rms"}, "needs a matrix norm"),
        (
            (2, 6, 4),
            {"blocks": "experts", "estimator": "storm_lowrank", "rank": 2},
            "one factorisation of the whole parameter",
        ),
    ],
)
def test_a_parameter_that_does_not_fit_its_blocks_is_refused(
    shape: tuple[int, ...], group: dict[str, object], message: str
) -> None:
    w = nn.Parameter(torch.zeros(shape))
    with pytest.raises(ValueError, match="blocks") as err:
        go.Gluon([{"params": [("w", w)], **group}])
    assert "'w'" in str(err.value) and message in str(err.value)


def test_a_model_takes_blocks_per_parameter_and_refuses_one_value() -> None:
    model = nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 3))
    opt = go.muon(model, head=[], blocks={"0.weight": "chunks=3"})
    group = next(g for g in opt.param_groups if g["blocks"] != "whole")
    assert group["param_names"] == ["0.weight"] and group["name"] == "hidden[chunks=3]"
    with pytest.raises(ValueError, match="for a model, blocks is per parameter"):
        go.muon(model, head=[], blocks="chunks=3")
    with pytest.raises(ValueError, match=r"blocks\['nothing\.\*'\].*match no trainable"):
        go.muon(model, head=[], blocks={"nothing.*": "chunks=3"})
    with pytest.raises(ValueError, match=r"blocks\['0.weight'\] = 'chunk=3'"):
        go.muon(model, head=[], blocks={"0.weight": "chunk=3"})
    with pytest.raises(ValueError, match="different values"):
        go.muon(model, head=[], blocks={"0.weight": "chunks=3", "0.*": "chunks=2"})
    # By class, with a name pattern inside it:
    opt = go.muon(model, head=[], blocks={nn.Linear: {"weight": "chunks=3"}})
    assert {n for g in opt.param_groups if g["blocks"] == "chunks=3" for n in g["param_names"]} == {
        "0.weight",
        "2.weight",
    }
