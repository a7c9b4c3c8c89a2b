"""distributed="replicated" on gloo: bit-identical to one process, each LMO computed once.

Each world size is one spawn of W processes running every case (``_cases.py``); the reference
is the same cases in this process with ``distributed="local"``, one thread, as the workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _cases
import pytest
import torch

import gluon_optim as go
from gluon_optim.lab.parallel import run


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out: dict[str, Any] = {"params": {}, "polar_calls": {}, "rsvd_calls": {}}
        for name in _cases.CASES:
            with _cases._Counter() as counter:
                net, _ = _cases.train(name, distributed="local")
            out["params"][name] = _cases.params(net)
            out["polar_calls"][name] = counter.polar_calls
            out["rsvd_calls"][name] = counter.rsvd_calls
        return out
    finally:
        torch.set_num_threads(threads)


def _spawned(world: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Any]]:
    tmp: Path = tmp_path_factory.mktemp(f"world{world}")
    yield run(_cases.parity, world, tmp)


@pytest.fixture(scope="module")
def world2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Any]]:
    yield from _spawned(2, tmp_path_factory)


@pytest.fixture(scope="module")
def world3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Any]]:
    yield from _spawned(3, tmp_path_factory)


def _results(request: pytest.FixtureRequest, world: int) -> list[Any]:
    out: list[Any] = request.getfixturevalue(f"world{world}")
    return out


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", list(_cases.CASES))
def test_every_rank_ends_bit_identical_to_one_process(
    request: pytest.FixtureRequest, reference: dict[str, Any], world: int, case: str
) -> None:
    expected = reference["params"][case]
    for rank, result in enumerate(_results(request, world)):
        got = result["params"][case]
        for name, value in expected.items():
            assert torch.equal(got[name], value), f"rank {rank}: {name} differs"


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", list(_cases.CASES))
def test_no_rank_repeats_another_ranks_newton_schulz(
    request: pytest.FixtureRequest, reference: dict[str, Any], world: int, case: str
) -> None:
    calls = [r["comm"][case]["polar_calls"] for r in _results(request, world)]
    assert sum(calls) == reference["polar_calls"][case]
    if reference["polar_calls"][case] >= world * _cases.STEPS:  # enough matrices to share
        assert all(c > 0 for c in calls), calls


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", ["limuon-exact", "limuon-ns-approx"])
def test_limuons_randomized_svd_runs_once_per_matrix(
    request: pytest.FixtureRequest, reference: dict[str, Any], world: int, case: str
) -> None:
    calls = [r["comm"][case]["rsvd_calls"] for r in _results(request, world)]
    assert sum(calls) == reference["rsvd_calls"][case] > 0, calls
    assert all(c > 0 for c in calls), calls


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", ["muon", "gluon-l0l1", "gluon-svd-f32"])
def test_bytes_sent_equal_the_documented_formula(
    request: pytest.FixtureRequest, world: int, case: str
) -> None:
    itemsize = {"bfloat16": 2, "float32": 4, "dual": 8}
    for result in _results(request, world):
        comm = result["comm"][case]
        # What went through all_gather_into_tensor, measured by wrapping it, every step alike:
        assert comm["gathered_bytes"] == _cases.STEPS * comm["last_bytes"] // (world - 1)
        # ... equals the formula: (W - 1) * sum over dtypes of the largest rank's share.
        formula = (world - 1) * sum(max(v) * itemsize[d] for d, v in comm["owned"].items())
        assert comm["last_bytes"] == formula
        # The agreement: one int32 all-reduce of 2 flags per parameter.
        n = sum(1 for _ in _cases.model().parameters())
        assert comm["last_agree_bytes"] == 8 * n
        assert comm["reduced_bytes"] == _cases.STEPS * 8 * n


def test_bad_input_is_a_clear_error_on_every_rank(tmp_path: Path) -> None:
    results = run(_cases.errors, 2, tmp_path)
    for rank, out in enumerate(results):
        assert out["nan"].startswith("FloatingPointError: Non-finite gradient"), (rank, out)
        assert "'fc.weight'" in out["nan"]
        assert out["skip"] == "no error", (rank, out)
        assert out["grad_none"].startswith("RuntimeError: distributed='replicated'"), out
        assert "['mix.weight'] have a gradient on 1 of 2 ranks" in out["grad_none"]
        assert out["order"].startswith("ValueError: distributed='replicated': rank"), out
        assert "different parameter groups" in out["order"]
        assert out["dtensor"].startswith("ValueError: Parameter 'w' is a DTensor"), out
        expected = "no convergence (injected)" if rank == 1 else "rank(s) [1] failed computing"
        assert expected in out["owner_fails"], out
        assert expected in out["owner_fails_blocks"], out


def test_owners_balance_the_newton_schulz_cost() -> None:
    # GPT-2 124M's matrices (12 layers: qkv 2304x768, proj 768x768, fc 3072x768, proj
    # 768x3072) at W = 8: longest-processing-time keeps the largest rank near the mean.
    norm = go.norms.get("spectral")
    shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12
    costs = [go.distributed.lmo_cost(norm, s, 5) for s in shapes]
    owners = go.distributed.assign_owners(costs, 8)
    loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(8)]
    assert max(loads) / (sum(loads) / 8) <= 1.15
    assert go.distributed.assign_owners(costs, 8) == owners  # deterministic


def test_equal_costs_are_dealt_out_by_kind() -> None:
    # A GPT block's fc (1536 x 384, tall) and proj (384 x 1536, wide) cost the same; in block
    # order, alternating ties would give rank 0 every tall one. By kind, each rank gets 3 + 3.
    shapes = [(1536, 384), (384, 1536)] * 6
    norm = go.norms.get("spectral")
    costs = [go.distributed.lmo_cost(norm, s, 5) for s in shapes]
    assert go.distributed.assign_owners(costs, 2)[0::2] == [0] * 6  # without kinds
    owners = go.distributed.assign_owners(costs, 2, shapes)
    for rank in (0, 1):
        mine = [s for s, o in zip(shapes, owners, strict=True) if o == rank]
        assert sorted(mine) == sorted([(1536, 384)] * 3 + [(384, 1536)] * 3)


def test_modes_and_their_errors() -> None:
    p = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match="Unknown distributed 'ddp'"):
        go.Gluon([p], distributed="ddp")
    with pytest.raises(ValueError, match="needs an initialised default process group"):
        go.Gluon([p], distributed="replicated")
    assert go.Gluon([p]).executor.mode == "local"
    assert go.muon([p], distributed="local").executor.mode == "local"


def test_ddp_with_the_full_batch_on_every_rank_equals_one_process(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    plain = {a.name: a.role for a in go.assign_roles(_cases.model())}
    for rank, result in enumerate(run(_cases.ddp, 2, tmp_path)):
        assert result["roles"] == {f"module.{n}": r for n, r in plain.items()}
        for case in _cases.DDP_CASES:
            for name, value in reference["params"][case].items():
                assert torch.equal(result[case][name], value), f"rank {rank}: {case} {name}"


def test_a_checkpoint_saved_at_two_ranks_resumes_at_one_and_three(
    tmp_path: Path, reference: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = run(_cases.save_at_two_steps, 2, tmp_path / "save")
    for name in _cases.RESUME_CASES:  # every rank holds the whole, identical state
        for key, value in saved[1][name]["optimizer"]["state"].items():
            for field, tensor in value.items():
                assert torch.equal(tensor, saved[0][name]["optimizer"]["state"][key][field])
    path = tmp_path / "checkpoint.pt"
    torch.save(saved[0], path)
    monkeypatch.setenv(_cases.CHECKPOINT_ENV, str(path))
    for world in (1, 3):
        for rank, result in enumerate(run(_cases.resume, world, tmp_path / f"resume{world}")):
            for case in _cases.RESUME_CASES:
                for name, value in reference["params"][case].items():
                    assert torch.equal(result[case][name], value), (world, rank, case, name)
